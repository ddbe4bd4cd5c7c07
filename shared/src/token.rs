//! Sturdy refs: the copy-pasteable strings that redeem into live capabilities.
//!
//! Format: `cs<kind>_<token id>_<secret>`, e.g. `cswriter_3f9a0c2e7b1d4a5c_<64 hex>`.
//! The token id (64 random bits) finds the row; the secret (256 bits from the OS
//! random source) is what the server checks against its argon2id hash. Only the
//! id may appear in logs; `SturdyRef`'s `Debug` hides the secret.

use rand::TryRng;
use std::fmt;
use std::str::FromStr;

use crate::ids::TokenId;

/// Bytes of secret in a token: 256 bits.
const SECRET_BYTES: usize = 32;
/// Bytes of token id: 64 bits, hex-encoded to 16 characters.
const ID_BYTES: usize = 8;

/// What a token redeems into. Authority shrinks down the list: Admin → Agent → Writer → Viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    Admin,
    Agent,
    Writer,
    Viewer,
}

impl TokenKind {
    pub const ALL: [TokenKind; 4] = [Self::Admin, Self::Agent, Self::Writer, Self::Viewer];

    /// The name stored in the database and used in the token prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Agent => "agent",
            Self::Writer => "writer",
            Self::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed sturdy ref. Holds the secret: never log it, never `Debug`-print it in full.
#[derive(Clone, PartialEq, Eq)]
pub struct SturdyRef {
    pub kind: TokenKind,
    pub id: TokenId,
    secret: String,
}

/// A string that is not a well-formed capsync token.
#[derive(Debug, thiserror::Error)]
#[error("not a capsync token (expected cs<admin|agent|writer|viewer>_<id>_<secret>)")]
pub struct MalformedToken;

impl SturdyRef {
    /// A new token of `kind` with a fresh id and secret from the OS random source.
    pub fn generate(kind: TokenKind) -> Self {
        Self {
            kind,
            id: TokenId(random_hex(ID_BYTES)),
            secret: random_hex(SECRET_BYTES),
        }
    }

    /// The secret part, to hash or verify. Never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The whole token string, to hand to its holder once.
    pub fn expose(&self) -> String {
        format!("cs{}_{}_{}", self.kind.as_str(), self.id, self.secret)
    }
}

impl fmt::Debug for SturdyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SturdyRef")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for SturdyRef {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = s.strip_prefix("cs").ok_or(MalformedToken)?;
        let mut parts = rest.splitn(3, '_');
        let (Some(kind), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedToken);
        };
        let kind = TokenKind::parse(kind).ok_or(MalformedToken)?;
        let is_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, ID_BYTES * 2) || !is_hex(secret, SECRET_BYTES * 2) {
            return Err(MalformedToken);
        }
        Ok(Self {
            kind,
            id: TokenId(id.to_owned()),
            secret: secret.to_owned(),
        })
    }
}

/// `bytes` random bytes from the OS random source, hex-encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::SysRng
        .try_fill_bytes(&mut buf)
        .expect("the OS random source failed");
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back() {
        for kind in TokenKind::ALL {
            let token = SturdyRef::generate(kind);
            let text = token.expose();
            assert!(text.starts_with(&format!("cs{kind}_")));
            assert_eq!(text.parse::<SturdyRef>().unwrap(), token);
        }
    }

    #[test]
    fn two_tokens_never_share_id_or_secret() {
        let a = SturdyRef::generate(TokenKind::Viewer);
        let b = SturdyRef::generate(TokenKind::Viewer);
        assert_ne!(a.id, b.id);
        assert_ne!(a.secret(), b.secret());
        assert_eq!(a.secret().len(), 64, "256-bit secret, hex");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = SturdyRef::generate(TokenKind::Agent).expose();
        for bad in [
            "",
            "cs",
            "csagent_",
            "csroot_0123456789abcdef_00",
            &good[..good.len() - 1],
            &good.replace("csagent", "xsagent"),
            &good.to_uppercase(),
        ] {
            assert!(bad.parse::<SturdyRef>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let token = SturdyRef::generate(TokenKind::Writer);
        let shown = format!("{token:?}");
        assert!(!shown.contains(token.secret()));
        assert!(shown.contains(token.id.as_str()));
    }
}
