#!/usr/bin/env python3
"""Fail on import cycles among the modules of pop3connex-core.

Reads every .rs file under crates/pop3connex-core/src, collects the
`use crate::...` lines (grouped `use crate::{a, b::c}` and multi-line use
lists included) and the inline `crate::x::` paths, maps each reference to a
module (a file is a module; a folder's mod.rs stands for the folder, and a
file inside a folder is the module `folder::file`), and finds the strongly
connected components of that graph. Every component with more than one module
is a cycle: it is printed and the script exits 1.

It also checks a layer table: lower layers (types, config, crypto, secret,
store, password, limits, policy) must never import session-level modules
(pop3, lmtp, server, connector, sasl, oauth, auth). A violation also exits 1.

Usage: python3 scripts/check-module-cycles.py [path/to/crates/pop3connex-core/src]
Stdlib only, so it runs in CI before anything is built.
"""

import os
import re
import sys

# Lower layer -> the top-level modules it must never import. A module of a
# lower layer may import other lower layers (acyclically: the cycle check
# covers that), never these.
SESSION_LEVEL = [
    "pop3", "lmtp", "server", "connector", "sasl", "oauth", "auth", "admin", "mailstore", "https",
    "security", "dnsbl", "import", "init",
]
LAYER_RULES = {
    "types": SESSION_LEVEL,
    "config": SESSION_LEVEL,
    "crypto": SESSION_LEVEL,
    "secret": SESSION_LEVEL,
    "store": SESSION_LEVEL,
    "password": SESSION_LEVEL,
    "limits": SESSION_LEVEL,
    "policy": SESSION_LEVEL,
    "scram": SESSION_LEVEL,
    "tls": SESSION_LEVEL,
    "logtext": SESSION_LEVEL,
    "events": SESSION_LEVEL,
}


def module_of_file(src, path):
    """`a/b.rs` -> ["a", "b"]; `a/mod.rs` -> ["a"]; `lib.rs` -> []."""
    rel = os.path.relpath(path, src)
    parts = rel[: -len(".rs")].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def strip_comments(text):
    """Remove // and /* */ comments and string literals (roughly) so that
    doc text mentioning `crate::x` does not count as an import."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def expand_use_tree(tree, prefix):
    """Expand a use tree such as `a::{b, c::{d, e}}` into full paths."""
    tree = tree.strip()
    out = []
    # Split at the top-level brace, if any.
    brace = tree.find("{")
    if brace == -1:
        path = prefix + [p for p in tree.split("::") if p]
        if path and path[-1].split(" as ")[0].strip() in ("self", "*"):
            path = path[:-1]
        out.append([p.split(" as ")[0].strip() for p in path])
        return out
    head = [p for p in tree[:brace].split("::") if p]
    inner = tree[brace + 1 : tree.rfind("}")]
    depth, start = 0, 0
    items = []
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    for item in items:
        if item.strip():
            out.extend(expand_use_tree(item, prefix + head))
    return out


def references(text):
    """Every `crate::...` path referenced in the (comment-free) text."""
    paths = []
    for m in re.finditer(r"\buse\s+crate::(.*?);", text, flags=re.S):
        tree = re.sub(r"\s+", " ", m.group(1))
        paths.extend(expand_use_tree(tree, []))
    # Inline paths such as `crate::oauth::start(...)` (also inside use lines,
    # which only repeats what was already found).
    for m in re.finditer(r"\bcrate((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
        paths.append([p for p in m.group(1).split("::") if p])
    return paths


def resolve(path, modules):
    """The longest known module that is a prefix of the path."""
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in modules:
            return tuple(path[:n])
    return None


def strongly_connected(graph):
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(sorted(component))
    return result


def cycle_path(component, graph):
    """One concrete cycle through the component, for the message."""
    members = set(component)
    start = component[0]
    # BFS from start back to start inside the component.
    prev = {}
    queue = [start]
    seen = {start}
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                path.reverse()
                return path + [start]
            if child not in seen:
                seen.add(child)
                prev[child] = node
                queue.append(child)
    return component


def name(module):
    return "::".join(module) if module else "crate"


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "crates", "pop3connex-core", "src")
    files = []
    for dirpath, _, filenames in os.walk(src):
        for f in filenames:
            if f.endswith(".rs"):
                files.append(os.path.join(dirpath, f))
    modules = {tuple(module_of_file(src, f)): f for f in files}
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            text = strip_comments(fh.read())
        for ref in references(text):
            target = resolve(ref, modules)
            if target is None or target == module or not target:
                continue
            # A parent folder referring to its own submodules (mod.rs
            # re-exporting) is structure, not a dependency; a submodule
            # using its parent is.
            if target[: len(module)] == module:
                continue
            graph[module].add(target)

    failed = False
    for component in strongly_connected(graph):
        if len(component) > 1:
            failed = True
            print("import cycle among: " + ", ".join(name(m) for m in component))
            print("  e.g. " + " -> ".join(name(m) for m in cycle_path(component, graph)))
    for module in sorted(graph):
        if not module or module[0] not in LAYER_RULES:
            continue
        for target in sorted(graph[module]):
            if target[0] in LAYER_RULES[module[0]]:
                failed = True
                print(f"layer violation: {name(module)} (lower layer) imports {name(target)}")
    if failed:
        return 1
    print(f"module graph of {len(graph)} modules: no cycles, no layer violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
