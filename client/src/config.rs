//! Where the connection settings come from: a flag, else its `ORBIT_*` environment variable
//! (clap reads both), else the chosen profile of the profiles file.
//!
//! The profiles file is TOML, one table per profile:
//!
//! ```toml
//! [default]
//! url = "https://orbit.example.com"
//! token = "orb_…"
//! org = "0190…"
//! directory = "0190…"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uuid::Uuid;

use crate::cli::Global;
use crate::exit::{ClientError, Result};

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub url: Option<String>,
    pub token: Option<String>,
    pub org: Option<String>,
    pub directory: Option<String>,
}

/// Everything needed to talk to one organization.
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    pub token: String,
    pub org: Uuid,
    pub directory: Option<Uuid>,
}

impl Connection {
    pub fn directory(&self) -> Result<Uuid> {
        self.directory.ok_or_else(|| {
            ClientError::Usage(
                "no directory: pass --directory ID, set ORBIT_DIRECTORY, or add `directory` to the profile"
                    .into(),
            )
        })
    }
}

fn default_profiles_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("orbit").join("profiles.toml"))
}

fn load_profiles(path: &Path) -> Result<BTreeMap<String, Profile>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ClientError::Usage(format!("cannot read profiles file {}: {e}", path.display()))
    })?;
    toml::from_str(&text)
        .map_err(|e| ClientError::Usage(format!("profiles file {}: {e}", path.display())))
}

/// The profile the flags name, if any: a named profile or file must exist; the default one may not.
fn profile(global: &Global) -> Result<Profile> {
    let explicit_file = global.profiles_file.is_some();
    let Some(path) = global.profiles_file.clone().or_else(default_profiles_file) else {
        return Ok(Profile::default());
    };
    if !explicit_file && !path.exists() {
        if let Some(name) = &global.profile {
            return Err(ClientError::Usage(format!(
                "profile {name:?} asked for, but there is no profiles file at {}",
                path.display()
            )));
        }
        return Ok(Profile::default());
    }
    let mut profiles = load_profiles(&path)?;
    match &global.profile {
        Some(name) => profiles.remove(name).ok_or_else(|| {
            ClientError::Usage(format!(
                "no profile {name:?} in {}; it has: {}",
                path.display(),
                profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        }),
        None => Ok(profiles.remove("default").unwrap_or_default()),
    }
}

fn parse_id(value: &str, what: &str) -> Result<Uuid> {
    value
        .trim()
        .parse()
        .map_err(|_| ClientError::Usage(format!("{what} {value:?} is not a UUID")))
}

pub fn resolve(global: &Global) -> Result<Connection> {
    let profile = profile(global)?;
    let url = global
        .url
        .clone()
        .or(profile.url)
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    let url = url.trim_end_matches('/').to_owned();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ClientError::Usage(format!(
            "the URL {url:?} must start with http:// or https://"
        )));
    }
    let token = global.token.clone().or(profile.token).ok_or_else(|| {
        ClientError::Usage(
            "no token: pass --token, set ORBIT_TOKEN, or add `token` to the profile".into(),
        )
    })?;
    let org = global.org.clone().or(profile.org).ok_or_else(|| {
        ClientError::Usage(
            "no organization: pass --org, set ORBIT_ORG, or add `org` to the profile".into(),
        )
    })?;
    let directory = global
        .directory
        .clone()
        .or(profile.directory)
        .map(|d| parse_id(&d, "directory"))
        .transpose()?;
    Ok(Connection {
        url,
        token,
        org: parse_id(&org, "organization")?,
        directory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn global(args: &[&str]) -> Global {
        crate::cli::Cli::try_parse_from(["orbit"].iter().chain(args).chain(&["directories"]))
            .unwrap()
            .global
    }

    #[test]
    fn flags_win_over_the_profile_and_the_profile_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profiles.toml");
        let org = Uuid::now_v7();
        let other = Uuid::now_v7();
        std::fs::write(
            &file,
            format!(
                "[default]\nurl = \"http://a:1\"\ntoken = \"t1\"\norg = \"{org}\"\n\n[big]\nurl = \"https://b/\"\ntoken = \"t2\"\norg = \"{org}\"\ndirectory = \"{other}\"\n"
            ),
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = resolve(&global(&["--profiles-file", path])).unwrap();
        assert_eq!(
            (c.url.as_str(), c.token.as_str(), c.org),
            ("http://a:1", "t1", org)
        );
        assert_eq!(c.directory, None);
        let c = resolve(&global(&[
            "--profiles-file",
            path,
            "--profile",
            "big",
            "--token",
            "t3",
        ]))
        .unwrap();
        assert_eq!((c.url.as_str(), c.token.as_str()), ("https://b", "t3"));
        assert_eq!(c.directory, Some(other));
        let err = resolve(&global(&["--profiles-file", path, "--profile", "nope"])).unwrap_err();
        assert!(err.to_string().contains("big, default"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_ids_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[default]\ntokn = \"x\"\n").unwrap();
        let err = resolve(&global(&["--profiles-file", file.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("tokn"), "{err}");
        std::fs::write(&file, "").unwrap();
        let err = resolve(&global(&[
            "--profiles-file",
            file.to_str().unwrap(),
            "--token",
            "t",
            "--org",
            "nope",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("not a UUID"), "{err}");
    }
}
