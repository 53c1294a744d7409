//! Client authentication: the credential sources behind pgwire's SCRAM, md5 and cleartext
//! mechanisms, built from the `[[users]]` of the configuration.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pgwire::api::auth::mechanism::{AuthMechanism, AuthMechanismFactory};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, ScramSecret};
use pgwire::api::auth::sasl::{SaslMechanismFactory, SaslMechanisms};
use pgwire::api::auth::{cleartext::CleartextPasswordAuth, md5pass::Md5PasswordAuth};
use pgwire::api::auth::{AuthSource, LoginInfo, Password};
use pgwire::error::{PgWireError, PgWireResult};
use ring::{digest, hmac};

use crate::config::{AuthMethod, Config};

/// Iterations for SCRAM secrets derived from cleartext passwords (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// A parsed PostgreSQL SCRAM verifier.
#[derive(Debug, Clone)]
pub struct ScramVerifier {
    /// Iteration count.
    pub iterations: usize,
    /// Salt.
    pub salt: Vec<u8>,
    /// `H(ClientKey)`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

/// Parses `SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>` (base64 parts).
pub fn parse_scram_verifier(text: &str) -> Option<ScramVerifier> {
    let rest = text.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iterations, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    Some(ScramVerifier {
        iterations: iterations.parse().ok().filter(|i| *i > 0)?,
        salt: STANDARD.decode(salt).ok()?,
        stored_key: STANDARD.decode(stored).ok()?,
        server_key: STANDARD.decode(server).ok()?,
    })
}

/// What pgfan knows about one user's secret.
#[derive(Debug, Clone)]
struct Credential {
    password: Option<String>,
    scram: ScramVerifier,
}

impl Credential {
    fn new(password: Option<&str>, verifier: Option<&str>) -> Option<Self> {
        let scram = match (verifier.and_then(parse_scram_verifier), password) {
            (Some(v), _) => v,
            (None, Some(p)) => {
                let salt: [u8; 16] = rand::random();
                let salted = gen_salted_password(p, &salt, SCRAM_ITERATIONS);
                let client_key = hmac_sha256(&salted, b"Client Key");
                ScramVerifier {
                    iterations: SCRAM_ITERATIONS,
                    salt: salt.to_vec(),
                    stored_key: digest::digest(&digest::SHA256, &client_key)
                        .as_ref()
                        .to_vec(),
                    server_key: hmac_sha256(&salted, b"Server Key"),
                }
            }
            (None, None) => return None,
        };
        Some(Self {
            password: password.map(str::to_string),
            scram,
        })
    }

    /// Checks a cleartext password against the verifier when no cleartext is stored.
    fn matches(&self, presented: &[u8]) -> bool {
        if let Some(p) = &self.password {
            return p.as_bytes() == presented;
        }
        let Ok(text) = std::str::from_utf8(presented) else {
            return false;
        };
        let salted = gen_salted_password(text, &self.scram.salt, self.scram.iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        digest::digest(&digest::SHA256, &client_key).as_ref() == self.scram.stored_key
    }
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, msg).as_ref().to_vec()
}

/// The configured users, as a pgwire [`AuthSource`] for every mechanism.
#[derive(Debug)]
struct UserStore {
    users: HashMap<String, Credential>,
    md5: bool,
}

impl UserStore {
    fn credential(&self, login: &LoginInfo) -> PgWireResult<&Credential> {
        let user = login.user().unwrap_or_default();
        self.users
            .get(user)
            .ok_or_else(|| PgWireError::InvalidPassword(user.to_string()))
    }
}

#[async_trait]
impl AuthSource for UserStore {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let cred = self.credential(login)?;
        let user = login.user().unwrap_or_default();
        if self.md5 {
            let salt: [u8; 4] = rand::random();
            let Some(p) = &cred.password else {
                // md5 needs the cleartext; a verifier-only user cannot log in this way
                return Err(PgWireError::InvalidPassword(user.to_string()));
            };
            let hash =
                postgres_protocol::authentication::md5_hash(user.as_bytes(), p.as_bytes(), salt);
            return Ok(Password::new(Some(salt.to_vec()), hash.into_bytes()));
        }
        Ok(Password::new(
            None,
            cred.password.clone().unwrap_or_default().into_bytes(),
        ))
    }

    async fn verify_password(
        &self,
        login: &LoginInfo,
        presented: &[u8],
    ) -> PgWireResult<Option<()>> {
        let cred = self.credential(login)?;
        if cred.matches(presented) {
            Ok(None)
        } else {
            Err(PgWireError::InvalidPassword(
                login.user().unwrap_or_default().to_string(),
            ))
        }
    }

    async fn get_scram_secret(&self, login: &LoginInfo) -> PgWireResult<(ScramSecret, Option<()>)> {
        let v = &self.credential(login)?.scram;
        Ok((
            ScramSecret::Verifier {
                salt: v.salt.clone(),
                iterations: v.iterations,
                stored_key: v.stored_key.clone(),
                server_key: v.server_key.clone(),
            },
            None,
        ))
    }
}

/// Creates the per-connection authentication state machine for the configured method.
pub struct ClientAuth {
    method: AuthMethod,
    store: Arc<UserStore>,
    primary: Option<Arc<dyn AuthMechanismFactory>>,
    scram_plain: Arc<dyn AuthMechanismFactory>,
    scram_tls: Arc<dyn AuthMechanismFactory>,
}

impl ClientAuth {
    /// Builds the mechanisms; `cert_pem` enables SCRAM-SHA-256-PLUS on TLS connections.
    pub fn new(config: &Config, cert_pem: Option<&[u8]>) -> Result<Self, PgWireError> {
        let users = config
            .users
            .iter()
            .filter_map(|u| {
                Credential::new(u.password.as_deref(), u.scram_verifier.as_deref())
                    .map(|c| (u.name.clone(), c))
            })
            .collect::<HashMap<_, _>>();
        let store = Arc::new(UserStore {
            users,
            md5: config.auth == AuthMethod::Md5,
        });
        let scram = ScramAuth::new(store.clone());
        let mut scram_plus = ScramAuth::new(store.clone());
        if let Some(pem) = cert_pem {
            scram_plus.configure_certificate(pem)?;
        }
        let plain: Arc<dyn SaslMechanismFactory> = Arc::new(scram);
        let plus: Arc<dyn SaslMechanismFactory> = Arc::new(scram_plus);
        let primary: Option<Arc<dyn AuthMechanismFactory>> = match config.auth {
            AuthMethod::Trust | AuthMethod::ScramSha256 => None,
            AuthMethod::Password => Some(Arc::new(CleartextPasswordAuth::new(store.clone()))),
            AuthMethod::Md5 => Some(Arc::new(Md5PasswordAuth::new(store.clone()))),
        };
        Ok(Self {
            method: config.auth,
            store,
            primary,
            scram_plain: Arc::new(SaslMechanisms::new(vec![plain])),
            scram_tls: Arc::new(SaslMechanisms::new(vec![plus])),
        })
    }

    /// The mechanism for a new connection of `user`; `None` means trust.
    ///
    /// As in PostgreSQL, `md5` falls back to SCRAM for a user whose secret is only a SCRAM
    /// verifier (an md5 exchange needs the cleartext password).
    pub fn mechanism(&self, secure: bool, user: &str) -> Option<Box<dyn AuthMechanism>> {
        let scram = if secure {
            &self.scram_tls
        } else {
            &self.scram_plain
        };
        match self.method {
            AuthMethod::Trust => None,
            AuthMethod::ScramSha256 => Some(scram.create()),
            AuthMethod::Md5 => {
                let verifier_only = self
                    .store
                    .users
                    .get(user)
                    .is_some_and(|c| c.password.is_none());
                if verifier_only {
                    Some(scram.create())
                } else {
                    self.primary.as_ref().map(|f| f.create())
                }
            }
            AuthMethod::Password => self.primary.as_ref().map(|f| f.create()),
        }
    }

    /// The configured method.
    pub fn method(&self) -> AuthMethod {
        self.method
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_checks_cleartext() {
        // produced by postgres-protocol exactly like PostgreSQL's own verifiers
        let v = postgres_protocol::password::scram_sha_256(b"s3cret");
        assert!(parse_scram_verifier(&v).is_some());
        let c = Credential::new(None, Some(&v)).unwrap();
        assert!(c.matches(b"s3cret"));
        assert!(!c.matches(b"wrong"));
        assert!(parse_scram_verifier("md5abc").is_none());
    }
}
