//! Role-based access control of the admin plane: the fine-grained
//! [`Permission`]s every API endpoint and console page declares, the
//! [`PermissionSet`] an administrator or service token holds, the built-in
//! roles and the custom ones from `[admin.roles.NAME]`.
//!
//! This module is pure data and imports nothing from the crate: the
//! configuration layer uses it to check permission names while parsing
//! (`config::admin` re-exports [`RoleConfig`]), the admin layer to decide.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One thing an administrator may do. Reads are separate from writes so
/// that an auditor can see everything and change nothing; destructive
/// permissions additionally need a fresh second-factor check
/// ([`Permission::needs_step_up`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    UsersRead,
    UsersWrite,
    UsersDelete,
    BansRead,
    BansWrite,
    ConnectorRead,
    ConnectorWrite,
    ImportWrite,
    EventsRead,
    AuditRead,
    ConfigRead,
    ConfigReload,
    KeysRotate,
    AdminsRead,
    AdminsWrite,
    TokensWrite,
}

impl Permission {
    /// Every permission, in declaration order (the bit order of [`PermissionSet`]).
    pub const ALL: &'static [Permission] = &[
        Permission::UsersRead,
        Permission::UsersWrite,
        Permission::UsersDelete,
        Permission::BansRead,
        Permission::BansWrite,
        Permission::ConnectorRead,
        Permission::ConnectorWrite,
        Permission::ImportWrite,
        Permission::EventsRead,
        Permission::AuditRead,
        Permission::ConfigRead,
        Permission::ConfigReload,
        Permission::KeysRotate,
        Permission::AdminsRead,
        Permission::AdminsWrite,
        Permission::TokensWrite,
    ];

    /// The name used in configuration, the API and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::UsersRead => "users.read",
            Permission::UsersWrite => "users.write",
            Permission::UsersDelete => "users.delete",
            Permission::BansRead => "bans.read",
            Permission::BansWrite => "bans.write",
            Permission::ConnectorRead => "connector.read",
            Permission::ConnectorWrite => "connector.write",
            Permission::ImportWrite => "import.write",
            Permission::EventsRead => "events.read",
            Permission::AuditRead => "audit.read",
            Permission::ConfigRead => "config.read",
            Permission::ConfigReload => "config.reload",
            Permission::KeysRotate => "keys.rotate",
            Permission::AdminsRead => "admins.read",
            Permission::AdminsWrite => "admins.write",
            Permission::TokensWrite => "tokens.write",
        }
    }

    /// The permission named `s` (exact, lower case); `None` for anything else.
    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.iter().copied().find(|p| p.as_str() == s)
    }

    /// Whether using it needs a recent second-factor check (step-up):
    /// the destructive and privilege-changing operations.
    pub fn needs_step_up(self) -> bool {
        matches!(
            self,
            Permission::UsersDelete
                | Permission::KeysRotate
                | Permission::AdminsWrite
                | Permission::TokensWrite
                | Permission::ConfigReload
        )
    }

    /// Whether it only reads.
    fn is_read(self) -> bool {
        self.as_str().ends_with(".read")
    }

    fn bit(self) -> u32 {
        // ALL is in declaration order, so the discriminant is the index.
        1 << (self as u32)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions (a bitset: cheap to copy, compare and intersect).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct PermissionSet(u32);

impl PermissionSet {
    /// Every permission.
    pub fn all() -> Self {
        Permission::ALL.iter().copied().collect()
    }

    pub fn contains(&self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn insert(&mut self, p: Permission) {
        self.0 |= p.bit();
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Whether every permission of `self` is also in `other`.
    pub fn is_subset(&self, other: &PermissionSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Both sets' permissions.
    pub fn union(&self, other: &PermissionSet) -> PermissionSet {
        PermissionSet(self.0 | other.0)
    }

    /// The permissions in [`Permission::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = Permission> + '_ {
        Permission::ALL.iter().copied().filter(|p| self.contains(*p))
    }

    /// The permissions' names in [`Permission::ALL`] order.
    pub fn names(&self) -> Vec<&'static str> {
        self.iter().map(Permission::as_str).collect()
    }

    /// Parses permission names; the error names the first unknown one.
    pub fn parse_list(names: &[String]) -> Result<Self, String> {
        let mut set = PermissionSet::default();
        for n in names {
            match Permission::parse(n) {
                Some(p) => set.insert(p),
                None => return Err(format!("unknown permission `{}`", n.escape_debug())),
            }
        }
        Ok(set)
    }
}

impl FromIterator<Permission> for PermissionSet {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = PermissionSet::default();
        for p in iter {
            set.insert(p);
        }
        set
    }
}

/// `[admin.roles.NAME]`: a custom role. Defined here (not in `config`) so
/// that the configuration can check its permission names with this module
/// without an import circle; `config::admin` re-exports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Permission names (`users.read`, ...), checked while parsing.
    pub permissions: Vec<String>,
    /// Optional scope: the role acts only on users of these domains
    /// (`user@domain`); unset: every user.
    #[serde(default)]
    pub domains: Option<Vec<String>>,
}

/// A role: a named set of permissions, optionally limited to users of some
/// domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub permissions: PermissionSet,
    /// `None`: every user; `Some`: only users `x@d` with `d` in the list.
    pub domains: Option<Vec<String>>,
    /// Built into the program (cannot be redefined in the configuration).
    pub builtin: bool,
}

/// The built-in roles.
pub fn builtin_roles() -> Vec<Role> {
    use Permission::*;
    let role = |name: &str, perms: &[Permission]| Role {
        name: name.to_owned(),
        permissions: perms.iter().copied().collect(),
        domains: None,
        builtin: true,
    };
    let reads: Vec<Permission> = Permission::ALL.iter().copied().filter(|p| p.is_read()).collect();
    vec![
        role("superadmin", Permission::ALL),
        role(
            "mailbox-admin",
            &[UsersRead, UsersWrite, UsersDelete, ImportWrite, ConnectorRead, ConnectorWrite, BansRead, EventsRead],
        ),
        role("security-operator", &[BansRead, BansWrite, UsersRead, EventsRead, AuditRead, ConfigRead]),
        role("auditor", &reads),
        role("key-custodian", &[KeysRotate, ConfigRead, AuditRead]),
    ]
}

/// Longest role name accepted (they are shown in tables and audit records).
const MAX_ROLE_NAME: usize = 64;

/// Whether `name` is a well-formed role name: lower-case ASCII letters,
/// digits and `-`, starting with a letter.
pub fn valid_role_name(name: &str) -> bool {
    name.len() <= MAX_ROLE_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The built-in and custom roles, checked once.
#[derive(Debug, Clone)]
pub struct Roles {
    roles: Vec<Role>,
}

impl Roles {
    /// The built-in roles plus the custom ones; refuses a custom role with
    /// a built-in role's name, a malformed name, an unknown permission, no
    /// permission or an empty domain scope.
    pub fn new(custom: &BTreeMap<String, RoleConfig>) -> Result<Self, String> {
        let mut roles = builtin_roles();
        for (name, rc) in custom {
            if roles.iter().any(|r| r.name == *name) {
                return Err(format!("role `{name}` is built in and cannot be redefined"));
            }
            if !valid_role_name(name) {
                return Err(format!(
                    "role name `{}` is invalid (lower-case letters, digits and '-', starting with a letter)",
                    name.escape_debug()
                ));
            }
            let permissions = PermissionSet::parse_list(&rc.permissions).map_err(|e| format!("role `{name}`: {e}"))?;
            if permissions.is_empty() {
                return Err(format!("role `{name}` has no permissions"));
            }
            let domains = match &rc.domains {
                None => None,
                Some(d) if d.is_empty() => {
                    return Err(format!("role `{name}`: domains must list at least one domain (or be left out)"))
                }
                Some(d) => {
                    let mut out = Vec::with_capacity(d.len());
                    for dom in d {
                        let dom = dom.trim().trim_start_matches('@').to_ascii_lowercase();
                        if dom.is_empty() || dom.contains(['@', ' ']) || dom.len() > 253 {
                            return Err(format!("role `{name}`: `{}` is not a domain", dom.escape_debug()));
                        }
                        out.push(dom);
                    }
                    Some(out)
                }
            };
            roles.push(Role { name: name.clone(), permissions, domains, builtin: false });
        }
        Ok(Roles { roles })
    }

    pub fn get(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// Built-in roles first, then custom ones by name.
    pub fn all(&self) -> &[Role] {
        &self.roles
    }

    /// What holding all of `role_names` allows: the union of their
    /// permissions, and the domain scope (`None`: every user). A role
    /// without a scope makes the whole result unscoped; scoped roles add
    /// their domains. Unknown role names (a custom role removed from the
    /// configuration) grant nothing.
    ///
    /// The scope applies to the whole union: an admin holding a scoped
    /// `users.write` role and an unscoped auditor role may write every
    /// user. Keep scoped administrators on scoped roles only.
    pub fn effective(&self, role_names: &[String]) -> (PermissionSet, Option<Vec<String>>) {
        let mut perms = PermissionSet::default();
        let mut scope: Option<Vec<String>> = Some(Vec::new());
        let mut any = false;
        for name in role_names {
            let Some(role) = self.get(name) else { continue };
            any = true;
            perms = perms.union(&role.permissions);
            match (&mut scope, &role.domains) {
                (Some(s), Some(d)) => {
                    for dom in d {
                        if !s.contains(dom) {
                            s.push(dom.clone());
                        }
                    }
                }
                (_, None) => scope = None,
                (None, Some(_)) => {}
            }
        }
        if !any {
            // Nothing granted: an empty scope, so not even a user check passes.
            return (perms, Some(Vec::new()));
        }
        (perms, scope)
    }
}

/// Whether `user` (`local@domain` or a bare name) is inside the domain
/// scope (`None`: every user). A bare name has no domain and is outside
/// every scope.
pub fn in_domain_scope(scope: Option<&[String]>, user: &str) -> bool {
    match scope {
        None => true,
        Some(domains) => match user.rsplit_once('@') {
            Some((_, d)) => domains.iter().any(|s| s.eq_ignore_ascii_case(d)),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> PermissionSet {
        PermissionSet::parse_list(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn every_permission_round_trips_and_names_are_distinct() {
        assert_eq!(Permission::ALL.len(), 16);
        let mut names = std::collections::HashSet::new();
        for (i, p) in Permission::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "ALL must be in declaration order");
            assert_eq!(Permission::parse(p.as_str()), Some(*p));
            assert!(names.insert(p.as_str()));
        }
        for bad in ["", "users", "USERS.READ", "users.read ", "users.*", "superadmin"] {
            assert_eq!(Permission::parse(bad), None, "{bad}");
        }
        assert_eq!(PermissionSet::all().iter().count(), 16);
        assert_eq!(PermissionSet::all().names(), Permission::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>());
    }

    #[test]
    fn step_up_is_needed_for_destructive_permissions_only() {
        let step: Vec<_> = Permission::ALL.iter().filter(|p| p.needs_step_up()).map(|p| p.as_str()).collect();
        assert_eq!(step, ["users.delete", "config.reload", "keys.rotate", "admins.write", "tokens.write"]);
    }

    #[test]
    fn set_operations() {
        let a = set(&["users.read", "bans.read"]);
        let b = set(&["users.read", "bans.read", "audit.read"]);
        assert!(a.is_subset(&b) && !b.is_subset(&a) && a.is_subset(&a));
        assert!(PermissionSet::default().is_subset(&a));
        assert!(b.is_subset(&PermissionSet::all()));
        assert_eq!(a.union(&b), b);
        assert_eq!(a.names(), ["users.read", "bans.read"]);
        let e = PermissionSet::parse_list(&["users.read".into(), "users.root".into()]).unwrap_err();
        assert!(e.contains("users.root"), "{e}");
    }

    #[test]
    fn builtin_roles_are_exactly_as_documented() {
        let roles = builtin_roles();
        let by = |n: &str| roles.iter().find(|r| r.name == n).unwrap().permissions.names();
        assert_eq!(
            roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["superadmin", "mailbox-admin", "security-operator", "auditor", "key-custodian"]
        );
        assert!(roles.iter().all(|r| r.builtin && r.domains.is_none()));
        assert_eq!(by("superadmin").len(), 16);
        assert_eq!(
            by("mailbox-admin"),
            [
                "users.read",
                "users.write",
                "users.delete",
                "bans.read",
                "connector.read",
                "connector.write",
                "import.write",
                "events.read"
            ]
        );
        assert_eq!(
            by("security-operator"),
            ["users.read", "bans.read", "bans.write", "events.read", "audit.read", "config.read"]
        );
        assert_eq!(
            by("auditor"),
            ["users.read", "bans.read", "connector.read", "events.read", "audit.read", "config.read", "admins.read"]
        );
        assert_eq!(by("key-custodian"), ["audit.read", "config.read", "keys.rotate"]);
    }

    fn custom(entries: &[(&str, &[&str], Option<&[&str]>)]) -> BTreeMap<String, RoleConfig> {
        entries
            .iter()
            .map(|(n, p, d)| {
                (
                    n.to_string(),
                    RoleConfig {
                        permissions: p.iter().map(|s| s.to_string()).collect(),
                        domains: d.map(|d| d.iter().map(|s| s.to_string()).collect()),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn custom_roles_are_checked() {
        let roles =
            Roles::new(&custom(&[("helpdesk", &["users.read", "users.write"], Some(&["Example.org"]))])).unwrap();
        let h = roles.get("helpdesk").unwrap();
        assert!(!h.builtin);
        assert_eq!(h.domains.as_deref(), Some(&["example.org".to_string()][..]));
        assert_eq!(roles.all().len(), 6);
        for (entries, expect) in [
            (custom(&[("auditor", &["users.read"], None)]), "built in"),
            (custom(&[("Help Desk", &["users.read"], None)]), "invalid"),
            (custom(&[("helpdesk", &["users.root"], None)]), "users.root"),
            (custom(&[("helpdesk", &[], None)]), "no permissions"),
            (custom(&[("helpdesk", &["users.read"], Some(&[]))]), "at least one domain"),
            (custom(&[("helpdesk", &["users.read"], Some(&["a@b"]))]), "not a domain"),
        ] {
            let e = Roles::new(&entries).unwrap_err();
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn effective_is_the_union_with_domain_scope() {
        let roles = Roles::new(&custom(&[
            ("helpdesk", &["users.read", "users.write"], Some(&["example.org"])),
            ("helpdesk-net", &["users.read"], Some(&["example.net", "example.org"])),
        ]))
        .unwrap();
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        let (p, scope) = roles.effective(&names(&["helpdesk", "helpdesk-net"]));
        assert_eq!(p, set(&["users.read", "users.write"]));
        assert_eq!(scope, Some(vec!["example.org".to_string(), "example.net".to_string()]));
        assert!(in_domain_scope(scope.as_deref(), "a@EXAMPLE.net"));
        assert!(!in_domain_scope(scope.as_deref(), "a@example.com"));
        assert!(!in_domain_scope(scope.as_deref(), "bare"));

        // An unscoped role lifts the scope.
        let (p, scope) = roles.effective(&names(&["helpdesk", "key-custodian"]));
        assert_eq!(p, set(&["users.read", "users.write", "keys.rotate", "config.read", "audit.read"]));
        assert_eq!(scope, None);
        assert!(in_domain_scope(None, "bare"));

        // Unknown roles grant nothing and scope to nothing.
        let (p, scope) = roles.effective(&names(&["removed-role"]));
        assert!(p.is_empty());
        assert_eq!(scope, Some(vec![]));
        let (p, _) = roles.effective(&names(&["superadmin", "removed-role"]));
        assert_eq!(p, PermissionSet::all());
    }
}
