//! Which keys of the configuration file changed: reported (as key names,
//! never values) when the server is asked to reload, so an operator sees
//! what an edit touched and that it waits for a restart.

use std::collections::BTreeMap;

use toml::Value;

/// Most keys one report names; more are counted.
pub const MAX_KEYS: usize = 50;

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        Value::Array(items) if items.iter().all(Value::is_table) && !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        // Compared by their TOML text; only the key is ever reported.
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// The dotted keys (`pop3.max_connections`, `connector.accounts[0].host`)
/// added, removed or changed between two configuration texts, sorted.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| s.parse::<toml::Table>().map(Value::Table).map_err(|e| e.message().to_owned());
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &parse(old)?, &mut a);
    flatten("", &parse(new)?, &mut b);
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// `changed_keys` as one line for an event: at most [`MAX_KEYS`] names.
pub fn summary(keys: &[String]) -> String {
    let mut s = keys.iter().take(MAX_KEYS).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > MAX_KEYS {
        s.push_str(&format!(" (+{} more)", keys.len() - MAX_KEYS));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_added_removed_and_changed_keys_never_values() {
        let old = "[pop3]\nmax_connections = 100\nimplicit_tls = [\"127.0.0.1:995\"]\n\
                   [[connector.accounts]]\nname = \"a\"\npassword = \"env:A_PW\"\n";
        let new = "[pop3]\nmax_connections = 200\nimplicit_tls = [\"127.0.0.1:995\"]\n[log]\nlevel = \"debug\"\n\
                   [[connector.accounts]]\nname = \"a\"\npassword = \"env:B_PW\"\n";
        let keys = changed_keys(old, new).unwrap();
        assert_eq!(keys, ["connector.accounts[0].password", "log.level", "pop3.max_connections"]);
        let line = summary(&keys);
        assert!(!line.contains("B_PW") && !line.contains("200"), "{line}");
        assert!(changed_keys(old, old).unwrap().is_empty());
        assert!(changed_keys(old, "[pop3\n").is_err());
        let many: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
        assert!(summary(&many).ends_with("(+10 more)"));
    }
}
