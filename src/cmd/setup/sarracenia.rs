//! Reading users, roles, passwords and the cluster name from a Sarracenia configuration
//! directory (`~/.config/sr3/`), so an operator who already keeps the pump's accounts
//! there does not have to keep a second list in `pumpwatch.toml`.
//!
//! Pure text parsers ([`parse_admin`], [`parse_credentials`]) plus one small function that
//! reads the files ([`load`]). What is understood:
//!
//! - `default.conf`, then `admin.conf` (a later line wins): `declare source NAME`,
//!   `declare subscriber NAME`, `feeder amqp://USER@host/`, `admin amqp://USER@host/`,
//!   `cluster NAME`. Other `declare` kinds (`env`, `exchange`...) and other directives
//!   are Sarracenia's business and are ignored.
//! - `credentials.conf`: one URL per line, `amqp[s]://user:password@host[:port]/`,
//!   optionally followed by options; user and password are percent-decoded. Lines of
//!   other schemes (sftp, https...) are ignored, and so are passwords of user names
//!   pumpwatch can never declare (a credential declares nothing; it only gives the
//!   password of a user declared in `admin.conf` or the configuration).
//!
//! Names (SPEC §2): a declared user is `[A-Za-z0-9_-]{1,64}`, like the configuration's
//! (a dot would let `sat`'s permissions match `q_sat.x.*`); a cluster name may also hold
//! dots. Any other name is an error naming the file and the line.
//!
//! `#` starts a comment line; blank lines are skipped; a malformed line is an error that
//! names the file and the line (and never repeats a password).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use percent_encoding::percent_decode_str;

use crate::config::{NAME_RULE, Role};

/// Why an import failed. Never contains a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("{file}:{line}: {reason}")]
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
}

/// One password found in `credentials.conf`, for one broker host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub host: String,
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("host", &self.host)
            .field("password", &"****")
            .finish()
    }
}

/// What an import found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Import {
    /// Declared accounts and their roles.
    pub users: BTreeMap<String, Role>,
    /// Passwords per user, in file order (a user may have several brokers).
    pub credentials: BTreeMap<String, Vec<Credential>>,
    pub cluster: Option<String>,
}

impl Import {
    /// The password of `user` for the broker on `host`: the entry for that host if there
    /// is one, else the first entry for the user.
    pub fn password_for(&self, user: &str, host: Option<&str>) -> Option<&str> {
        let creds = self.credentials.get(user)?;
        host.and_then(|h| creds.iter().find(|c| c.host.eq_ignore_ascii_case(h)))
            .or_else(|| creds.first())
            .map(|c| c.password.as_str())
    }
}

impl Import {
    /// The password of `user` for the broker on `host` only (a neighbour's account:
    /// another host's line is another broker's password).
    pub fn password_at(&self, user: &str, host: &str) -> Option<&str> {
        self.credentials
            .get(user)?
            .iter()
            .find(|c| c.host.eq_ignore_ascii_case(host))
            .map(|c| c.password.as_str())
    }
}

/// The account names pumpwatch accepts: the configuration's rule
/// ([`crate::config::is_valid_name`], no dots).
pub fn valid_user_name(name: &str) -> bool {
    crate::config::is_valid_name(name)
}

type Parser = fn(&str, &str, &mut Import) -> Result<(), ImportError>;

/// Reads `default.conf`, `admin.conf` and `credentials.conf` from `dir`; each is
/// optional, but at least one must be there.
pub fn load(dir: &Path) -> Result<Import, ImportError> {
    let read_err = |path: &Path, reason: String| ImportError::Read {
        path: path.display().to_string(),
        reason,
    };
    if !dir.is_dir() {
        return Err(read_err(dir, "not a directory".to_owned()));
    }
    let mut import = Import::default();
    let mut found = false;
    for (name, parse) in [
        ("default.conf", parse_admin as Parser),
        ("admin.conf", parse_admin),
        ("credentials.conf", parse_credentials),
    ] {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                found = true;
                parse(&text, &path.display().to_string(), &mut import)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(read_err(&path, e.to_string())),
        }
    }
    if !found {
        return Err(read_err(
            dir,
            "has no default.conf, admin.conf or credentials.conf".to_owned(),
        ));
    }
    Ok(import)
}

/// The meaningful lines of a Sarracenia file: (1-based line number, trimmed text).
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// `default.conf` / `admin.conf` directives (see the module doc).
pub fn parse_admin(text: &str, file: &str, import: &mut Import) -> Result<(), ImportError> {
    for (line, content) in lines(text) {
        let err = |reason: String| ImportError::Syntax {
            file: file.to_owned(),
            line,
            reason,
        };
        let words: Vec<&str> = content.split_whitespace().collect();
        match words[0] {
            "declare" => {
                let role = match words.get(1) {
                    Some(&"source") => Role::Source,
                    Some(&"subscriber") => Role::Subscriber,
                    Some(_) => continue, // declare env, declare exchange...: not accounts
                    None => return Err(err("declare what? (declare source NAME)".to_owned())),
                };
                let [_, kind, name] = words[..] else {
                    return Err(err(format!("expected: declare {} NAME", role.name())));
                };
                if !valid_user_name(name) {
                    return Err(err(format!("invalid {kind} name {name:?}: {NAME_RULE}")));
                }
                import.users.insert(name.to_owned(), role);
            }
            directive @ ("feeder" | "admin") => {
                let [_, url] = words[..] else {
                    return Err(err(format!("expected: {directive} amqp://USER@host/")));
                };
                let parsed = parse_url(url).map_err(|r| err(format!("{directive}: {r}")))?;
                if !valid_user_name(&parsed.user) {
                    return Err(err(format!(
                        "{directive}: invalid user name {:?}: {NAME_RULE}",
                        parsed.user
                    )));
                }
                let role = if directive == "feeder" {
                    Role::Feeder
                } else {
                    Role::Admin
                };
                import.users.insert(parsed.user.clone(), role);
                // `feeder amqp://tfeed:pw@host/` carries the password too.
                add_credential(import, parsed);
            }
            "cluster" => {
                let [_, name] = words[..] else {
                    return Err(err("expected: cluster NAME".to_owned()));
                };
                if !crate::config::is_valid_cluster_name(name) {
                    return Err(err(format!(
                        "invalid cluster name {name:?}: {}",
                        crate::config::CLUSTER_RULE
                    )));
                }
                import.cluster = Some(name.to_owned());
            }
            _ => {} // Sarracenia's other options
        }
    }
    Ok(())
}

/// `credentials.conf`: one URL (with user and password) per line, options after it.
pub fn parse_credentials(text: &str, file: &str, import: &mut Import) -> Result<(), ImportError> {
    for (line, content) in lines(text) {
        let err = |reason: String| ImportError::Syntax {
            file: file.to_owned(),
            line,
            reason,
        };
        let url = content.split_whitespace().next().unwrap_or_default();
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(err(
                "not a URL (expected amqp://user:password@host/)".to_owned()
            ));
        };
        if !matches!(scheme.to_ascii_lowercase().as_str(), "amqp" | "amqps") {
            continue; // sftp, ftp, https...: not broker accounts
        }
        let parsed = parse_url(url).map_err(err)?;
        add_credential(import, parsed);
    }
    Ok(())
}

fn add_credential(import: &mut Import, url: ParsedUrl) {
    // A password for a name pumpwatch can never declare (`first.last` on some other
    // broker sr3 also talks to) is of no use, and refusing the whole file for it would
    // make operators edit sr3's own configuration: it is left out.
    if !valid_user_name(&url.user) {
        return;
    }
    if let Some(password) = url.password {
        import
            .credentials
            .entry(url.user)
            .or_default()
            .push(Credential {
                host: url.host,
                password,
            });
    }
}

struct ParsedUrl {
    user: String,
    password: Option<String>,
    host: String,
}

/// `scheme://user[:password]@host[:port][/vhost]`, user and password percent-decoded.
/// Written by hand rather than with `url`, which would take a `#` or `?` in a password
/// that was not percent-encoded for the start of a fragment or query. Errors never
/// repeat the URL (it may hold a password).
fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Err("not a URL (expected amqp://user@host/)".to_owned());
    };
    let Some(at) = rest.rfind('@') else {
        return Err("the URL names no user (expected amqp://user@host/)".to_owned());
    };
    let (userinfo, hostpart) = (&rest[..at], &rest[at + 1..]);
    let hostport = hostpart.split('/').next().unwrap_or_default();
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => hostport.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return Err("the URL names no host".to_owned());
    }
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    let decode = |s: &str, what: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| format!("the {what} is not UTF-8 once percent-decoded"))
    };
    let user = decode(user, "user")?;
    if user.is_empty() {
        return Err("the URL names no user".to_owned());
    }
    let password = password.map(|p| decode(p, "password")).transpose()?;
    Ok(ParsedUrl {
        user,
        password,
        host: host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(text: &str) -> Result<Import, ImportError> {
        let mut import = Import::default();
        parse_admin(text, "admin.conf", &mut import)?;
        Ok(import)
    }

    fn creds(text: &str) -> Result<Import, ImportError> {
        let mut import = Import::default();
        parse_credentials(text, "credentials.conf", &mut import)?;
        Ok(import)
    }

    #[test]
    fn admin_conf_declarations() {
        let import = admin(
            "# the pump\n\
             \n\
             cluster ddsr.cmc\n\
             declare source radar\n\
             declare subscriber cfs\n\
             declare env SOMEVAR=1\n\
             declare exchange xs_whatever\n\
             feeder amqp://tfeed@localhost/\n\
             admin   amqps://bunnymaster:s%40cret@pump.example:5671/\n\
             \t declare source sat  \n\
             loglevel debug\n",
        )
        .unwrap();
        let users: Vec<(&str, Role)> = import.users.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        assert_eq!(
            users,
            [
                ("bunnymaster", Role::Admin),
                ("cfs", Role::Subscriber),
                ("radar", Role::Source),
                ("sat", Role::Source),
                ("tfeed", Role::Feeder),
            ]
        );
        assert_eq!(import.cluster.as_deref(), Some("ddsr.cmc"));
        // The admin URL carried a password; the feeder URL did not.
        assert_eq!(import.password_for("bunnymaster", None), Some("s@cret"));
        assert_eq!(import.password_for("tfeed", None), None);
    }

    #[test]
    fn a_later_declaration_wins() {
        let import = admin("declare source x\ndeclare subscriber x\n").unwrap();
        assert_eq!(import.users["x"], Role::Subscriber);
    }

    #[test]
    fn malformed_admin_lines_name_file_and_line() {
        let table = [
            ("declare", 1, "declare what"),
            ("\ndeclare source", 2, "declare source NAME"),
            ("# c\ndeclare subscriber a b", 2, "declare subscriber NAME"),
            ("declare source bad/name", 1, "invalid source name"),
            ("declare source sat.x", 1, "invalid source name \"sat.x\""),
            ("declare subscriber a*b", 1, "no dots"),
            ("declare subscriber a#b", 1, "invalid subscriber name"),
            ("declare source sat|x", 1, "invalid source name"),
            ("declare source sat:x", 1, "invalid source name"),
            ("declare source été", 1, "invalid source name"),
            (
                "feeder amqp://pump.feed@h/",
                1,
                "feeder: invalid user name \"pump.feed\"",
            ),
            (
                "admin amqp://a%2Eb@h/",
                1,
                "admin: invalid user name \"a.b\"",
            ),
            ("cluster a/b", 1, "invalid cluster name"),
            ("cluster .x", 1, "invalid cluster name"),
            ("feeder", 1, "feeder amqp://USER@host/"),
            ("admin amqp://localhost/", 1, "names no user"),
            ("feeder not-a-url", 1, "not a URL"),
            ("cluster", 1, "cluster NAME"),
            ("cluster a b", 1, "cluster NAME"),
            ("admin amqp://x:secretpw@/", 1, "no host"),
        ];
        for (text, line, want) in table {
            let e = admin(text).unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("admin.conf:{line}: ")) && shown.contains(want),
                "{text:?}: {shown}"
            );
            assert!(!shown.contains("secretpw"), "{shown}");
        }
    }

    #[test]
    fn credentials_are_decoded_and_matched_by_host() {
        let import = creds(
            "# passwords\n\
             amqp://radar:p%40ss%2Fw%3Ard@pump-a.example:5672/\n\
             amqps://radar:other@pump-b.example/ ssl_version=TLSv1.2\n\
             sftp://radar:ignored@files.example/ ssh_keyfile=/k\n\
             https://cfs:ignored@web.example/\n\
             amqp://cfs:a#b?c@[::1]:5672/%2f\n\
             amqp://nopass@pump-a.example/\n",
        )
        .unwrap();
        assert_eq!(import.password_for("radar", None), Some("p@ss/w:rd"));
        assert_eq!(
            import.password_for("radar", Some("PUMP-B.example")),
            Some("other")
        );
        assert_eq!(
            import.password_for("radar", Some("elsewhere")),
            Some("p@ss/w:rd")
        );
        assert_eq!(import.password_for("cfs", Some("::1")), Some("a#b?c"));
        assert_eq!(import.password_for("nopass", None), None);
        assert!(import.users.is_empty(), "credentials declare no roles");
        // A password for a name that can never be declared is left out, not an error.
        let import = creds("amqp://first.last:pw@other.example/\namqp://ok:pw@h/\n").unwrap();
        assert_eq!(import.credentials.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn malformed_credentials_never_echo_the_password() {
        let table = [
            ("user:hunter22@host", "not a URL"),
            ("amqp://hunter22host/", "names no user"),
            ("amqp://:hunter22@h/", "names no user"),
            ("amqp://u:hunter22%ff@h/", "not UTF-8"),
        ];
        for (text, want) in table {
            let e = creds(&format!("\n{text}\n")).unwrap_err().to_string();
            assert!(
                e.starts_with("credentials.conf:2: ") && e.contains(want),
                "{text}: {e}"
            );
            assert!(!e.contains("hunter22"), "{e}");
        }
        assert!(!format!("{:?}", creds("amqp://u:hunter22@h/").unwrap()).contains("hunter22"));
    }

    #[test]
    fn load_reads_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("has no default.conf")
        );
        std::fs::write(dir.path().join("default.conf"), "declare source a\n").unwrap();
        std::fs::write(
            dir.path().join("admin.conf"),
            "declare subscriber a\ncluster c1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("credentials.conf"), "amqp://a:pw@h/\n").unwrap();
        let import = load(dir.path()).unwrap();
        assert_eq!(import.users["a"], Role::Subscriber, "admin.conf read last");
        assert_eq!(import.cluster.as_deref(), Some("c1"));
        assert_eq!(import.password_for("a", Some("h")), Some("pw"));
        std::fs::write(dir.path().join("admin.conf"), "declare source\n").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("admin.conf:1:"), "{e}");
        assert!(load(&dir.path().join("missing")).is_err());
    }
}
