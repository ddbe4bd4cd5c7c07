//! `capsync opencode install` and `uninstall`: put capsync's plugin where opencode loads
//! it, with its settings, and the agent token beside the journal, readable by the user only.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use capsync_shared::TokenKind;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::super::output::Output;
use super::super::{EXIT_OK, Global, finish};
use capsync_client::error::ClientError;
use capsync_client::opencode::shipper::ShareMode;

use super::ShareArg;

/// The plugin, as the repository ships it; `install` fills in its settings.
const PLUGIN_SOURCE: &str = include_str!("../../../opencode/capsync-journal.js");

/// The line of [`PLUGIN_SOURCE`] that `install` replaces with the settings.
const SETTINGS_LINE: &str = "const INSTALLED = {};";

/// The plugin's file name in opencode's plugin directory.
pub const PLUGIN_FILE: &str = "capsync.js";

/// Where to install: one project, or every project of this user.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The project directory: the plugin goes to DIR/.opencode/plugin/, the journal
    /// and token to DIR/.opencode/capsync/
    #[arg(long, value_name = "DIR")]
    pub project: Option<PathBuf>,
    /// The user's opencode configuration: the plugin goes to
    /// $XDG_CONFIG_HOME/opencode/plugin/ (~/.config/opencode/plugin/), the journal and
    /// token to $XDG_STATE_HOME/capsync/opencode/ (~/.local/state/capsync/opencode/)
    #[arg(long)]
    pub global: bool,
}

/// Set up capsync's opencode plugin: every session change journaled, shipped exactly once (agent token)
///
/// Writes the plugin to opencode's plugin directory (project or global), the agent
/// token to a file readable by you only, and a .gitignore that keeps both the token and
/// the journal out of git. Nothing else needs starting: when opencode loads the plugin,
/// it starts `capsync opencode ship`, which sends the journal to the server, keeps
/// retrying while the server is unreachable, and finishes after opencode exits. The
/// next opencode start resumes whatever was left.
///
/// The plugin also points opencode's own share client at this server, so /share (and
/// `opencode run --share`) make capsync shares and opencode shows their links.
///
/// --share picks the sessions shipped:
///   manual (default)  only sessions you share in opencode (/share), with their
///                     sub-agent sessions; nothing leaves the machine otherwise
///   auto              every session, sub-agent sessions included (opencode's
///                     auto-sharing is turned on too)
///
/// Run it again to change settings or after moving the capsync binary; `capsync
/// opencode status` lists the shares and their links; `capsync opencode uninstall`
/// removes the plugin. The token is checked with the server first.
///
/// Examples:
///   capsync --token-file agent.token opencode install --project .
///   capsync --token $AGENT opencode install --global --share auto
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: Target,
    /// Which sessions are shipped
    #[arg(long, value_enum, default_value_t = ShareArg::Manual)]
    pub share: ShareArg,
}

/// Remove capsync's opencode plugin (no token)
///
/// Deletes the plugin file, so opencode stops journaling. The journal directory (with
/// the token and whatever was not sent yet) stays unless --purge is given.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub target: Target,
    /// Also delete the journal directory: the token, unsent changes, the shipper's state
    #[arg(long)]
    pub purge: bool,
}

/// Where the plugin and its directory go for a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The plugin file.
    pub plugin: PathBuf,
    /// The shipper's directory: journal, token, state, outboxes, log.
    pub dir: PathBuf,
}

impl Layout {
    pub fn of(target: &Target) -> Result<Self, ClientError> {
        match &target.project {
            Some(project) => {
                let project = std::path::absolute(project).map_err(|e| {
                    ClientError::invalid(format!("--project {}: {e}", project.display()))
                })?;
                if !project.is_dir() {
                    return Err(ClientError::invalid(format!(
                        "--project {}: not a directory",
                        project.display()
                    )));
                }
                let dot = project.join(".opencode");
                Ok(Self {
                    plugin: dot.join("plugin").join(PLUGIN_FILE),
                    dir: dot.join("capsync"),
                })
            }
            None => Ok(Self {
                plugin: xdg_dir("XDG_CONFIG_HOME", ".config")?
                    .join("opencode/plugin")
                    .join(PLUGIN_FILE),
                dir: xdg_dir("XDG_STATE_HOME", ".local/state")?.join("capsync/opencode"),
            }),
        }
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }

    pub fn settings_file(&self) -> PathBuf {
        self.dir.join("install.json")
    }
}

/// An XDG base directory as opencode finds it: the variable if set to an absolute
/// path, else `~/<fallback>` (on every platform, as opencode does).
fn xdg_dir(variable: &str, fallback: &str) -> Result<PathBuf, ClientError> {
    if let Some(dir) = std::env::var_os(variable).map(PathBuf::from)
        && dir.is_absolute()
    {
        return Ok(dir);
    }
    match std::env::var_os("HOME").map(PathBuf::from) {
        Some(home) if home.is_absolute() => Ok(home.join(fallback)),
        _ => Err(ClientError::invalid(format!(
            "--global needs HOME (or {variable}) to find opencode's directories"
        ))),
    }
}

/// What `install` recorded: the plugin's settings, and where things are (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Installed {
    pub plugin: PathBuf,
    pub dir: PathBuf,
    pub journal: PathBuf,
    pub token_file: PathBuf,
    pub log: PathBuf,
    pub server: String,
    pub share_origin: String,
    pub share: String,
    /// The command the plugin starts.
    pub shipper: Vec<String>,
}

impl Installed {
    /// Reads `install.json` from a shipper directory.
    pub fn read(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join("install.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ClientError::invalid(format!(
                "{}: {e} (is the plugin installed? `capsync opencode install`)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::invalid(format!("{}: {e}", path.display())))
    }

    /// The plugin's settings, as the plugin reads them.
    fn plugin_settings(&self) -> serde_json::Value {
        json!({
            "journal": self.journal,
            "shipper": self.shipper,
            "log": self.log,
            "tokenFile": self.token_file,
            "shareOrigin": self.share_origin,
            "share": self.share,
        })
    }
}

pub async fn install(global: &Global, out: &Output, args: &InstallArgs) -> Result<u8, ClientError> {
    let layout = Layout::of(&args.target)?;
    let share = ShareMode::from(args.share);
    // The token must work before anything is written.
    let (conn, redeemed) = global.redeem(&[TokenKind::Agent]).await?;
    redeemed.into_agent()?;
    finish(conn).await;
    let token = global.token(&[TokenKind::Agent])?;

    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| ClientError::invalid(format!("cannot find the capsync binary's path: {e}")))?;
    let exe = exe.to_str().ok_or_else(|| {
        ClientError::invalid(format!(
            "the capsync binary's path {} is not UTF-8",
            exe.display()
        ))
    })?;
    let dir = &layout.dir;
    let path_text = |path: &Path| {
        path.to_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::invalid(format!("{} is not a UTF-8 path", path.display())))
    };
    let installed = Installed {
        plugin: layout.plugin.clone(),
        dir: dir.clone(),
        journal: dir.join("journal"),
        token_file: layout.token_file(),
        log: dir.join("shipper.log"),
        server: global.server.to_string(),
        share_origin: global.share_origin(),
        share: share.as_str().to_owned(),
        shipper: vec![
            exe.to_owned(),
            "--server".into(),
            global.server.to_string(),
            "--token-file".into(),
            path_text(&layout.token_file())?,
            "opencode".into(),
            "ship".into(),
            "--dir".into(),
            path_text(dir)?,
            "--share".into(),
            share.as_str().into(),
        ],
    };

    create_private_dir(dir)?;
    write_file(
        &dir.join(".gitignore"),
        "# capsync's opencode journal and token: never commit them\n*\n",
        0o600,
    )?;
    write_file(&layout.token_file(), &format!("{token}\n"), 0o600)?;
    let settings = serde_json::to_string_pretty(&installed).unwrap_or_default();
    write_file(&layout.settings_file(), &format!("{settings}\n"), 0o600)?;
    let plugin_dir = layout
        .plugin
        .parent()
        .expect("the plugin path has a directory");
    std::fs::create_dir_all(plugin_dir).map_err(|e| io_error(plugin_dir, e))?;
    write_file(&layout.plugin, &plugin_source(&installed), 0o644)?;

    let report = json!({
        "plugin": installed.plugin,
        "dir": installed.dir,
        "journal": installed.journal,
        "tokenFile": installed.token_file,
        "log": installed.log,
        "share": installed.share,
        "server": installed.server,
    });
    out.result(&report, || {
        format!(
            "wrote the plugin      {}\n\
             wrote the agent token {} (readable by you only)\n\
             journal and outboxes  {}\n\
             shipper log           {}\n\
             sessions shipped      {} ({})\n\
             Start opencode as usual; `capsync opencode status {}` lists the shares and their links.",
            installed.plugin.display(),
            installed.token_file.display(),
            installed.dir.display(),
            installed.log.display(),
            installed.share,
            match share {
                ShareMode::Manual => "the ones you /share in opencode, with their sub-agent sessions",
                ShareMode::Auto => "every session, sub-agent sessions included",
            },
            target_flag(&args.target),
        )
    });
    Ok(EXIT_OK)
}

pub fn uninstall(out: &Output, args: &UninstallArgs) -> Result<u8, ClientError> {
    let layout = Layout::of(&args.target)?;
    let removed_plugin = remove_if_present(&layout.plugin)?;
    let removed_dir = if args.purge && layout.dir.exists() {
        std::fs::remove_dir_all(&layout.dir).map_err(|e| io_error(&layout.dir, e))?;
        true
    } else {
        false
    };
    let report = json!({
        "plugin": layout.plugin, "removedPlugin": removed_plugin,
        "dir": layout.dir, "removedDir": removed_dir,
    });
    out.result(&report, || {
        let mut lines = vec![if removed_plugin {
            format!("removed the plugin {}", layout.plugin.display())
        } else {
            format!("no plugin at {}", layout.plugin.display())
        }];
        if removed_dir {
            lines.push(format!("deleted {}", layout.dir.display()));
        } else if layout.dir.exists() {
            lines.push(format!(
                "kept {} (the token and anything not sent yet); --purge deletes it",
                layout.dir.display()
            ));
        }
        lines.join("\n")
    });
    Ok(EXIT_OK)
}

/// `--project DIR` or `--global`, for messages.
pub fn target_flag(target: &Target) -> String {
    match &target.project {
        Some(project) => format!("--project {}", project.display()),
        None => "--global".to_owned(),
    }
}

/// The plugin with `installed`'s settings in place of its empty ones.
fn plugin_source(installed: &Installed) -> String {
    let settings = format!(
        "const INSTALLED = {};",
        serde_json::to_string(&installed.plugin_settings()).unwrap_or_default()
    );
    PLUGIN_SOURCE.replacen(SETTINGS_LINE, &settings, 1)
}

fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_error(dir, e))?;
    // An existing directory keeps its mode otherwise.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_error(dir, e))
}

/// Writes `text` to `path` with `mode`, through a temporary file renamed over it, so a
/// reader never sees half a file.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), ClientError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| io_error(&temp, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| io_error(path, e))
}

fn remove_if_present(path: &Path) -> Result<bool, ClientError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(path, e)),
    }
}

fn io_error(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::invalid(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_source_has_the_line_install_fills_in() {
        assert_eq!(PLUGIN_SOURCE.matches(SETTINGS_LINE).count(), 1);
        let installed = Installed {
            plugin: "/p/.opencode/plugin/capsync.js".into(),
            dir: "/p/.opencode/capsync".into(),
            journal: "/p/.opencode/capsync/journal".into(),
            token_file: "/p/.opencode/capsync/token".into(),
            log: "/p/.opencode/capsync/shipper.log".into(),
            server: "127.0.0.1:7420".into(),
            share_origin: "http://127.0.0.1:7421".into(),
            share: "manual".into(),
            shipper: vec!["/bin/capsync".into(), "opencode".into(), "ship".into()],
        };
        let source = plugin_source(&installed);
        assert!(!source.contains(SETTINGS_LINE));
        assert!(source.contains(r#"const INSTALLED = {"journal":"/p/.opencode/capsync/journal","#));
        assert!(source.contains(r#""shipper":["/bin/capsync","opencode","ship"]"#));
    }
}
