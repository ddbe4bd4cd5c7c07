//! Value parsers shared by the command line's flags: the server address and durations.

use std::ffi::OsStr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

use capsync_client::server_addr::ServerList;

/// Parses `--server` (and `CAPSYNC_SERVER`) into a [`ServerAddr`]. Unlike clap's own
/// parsers, its errors do not repeat the value: a share-page link pasted by mistake
/// carries a viewer token.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrParser;

impl TypedValueParser for ServerAddrParser {
    type Value = ServerList;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<ServerList, clap::Error> {
        let flag = arg.map_or_else(|| "--server".to_owned(), ToString::to_string);
        let refuse = |why: String| {
            let mut cmd = cmd.clone();
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for '{flag}': {why}"),
            )
            .format(&mut cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("not valid UTF-8".to_owned()))?;
        text.parse().map_err(|e| refuse(format!("{e}")))
    }
}

/// Parses a duration that must be more than zero: `500ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(s.trim()).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_must_be_positive() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 10s "), Ok(Duration::from_secs(10)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
