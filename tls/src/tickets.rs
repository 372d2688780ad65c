//! TLS 1.3 session tickets whose keys outlive the coordinator process.
//!
//! After a coordinator restart every agent of the cluster dials at once. A full mutual-TLS
//! handshake costs both sides a P-256 signature and a certificate-chain verification; a
//! resumed one (a ticket from the agent's last session) skips both and keeps only the X25519
//! exchange, so the handshake stays forward-secret. rustls's own ticketer keeps its key in
//! memory, so a restart would throw every ticket away: here the keys live in a file in the
//! coordinator's data dir (`tls-ticket-keys`, mode 0600), a new one every [`ROTATE_EVERY`],
//! each kept for [`KEEP_FOR`] (the ticket lifetime plus one rotation).
//!
//! A ticket holds the client's certificate chain as first verified, so it must not outlive
//! the trust it was issued under:
//! - the key that seals a ticket is derived from the file's key *and* the CA file's bytes,
//!   so a new CA (a rotated or revoked cluster CA, re-read on SIGHUP) opens no old ticket;
//! - the acceptor ([`crate::server`]) checks a resumed client certificate's validity period
//!   itself, as the full handshake would have;
//! - a ticket is accepted for [`TICKET_LIFETIME`] at most (TLS 1.3's cap is 7 days).
//!
//! Anyone who reads the key file can mint tickets for any identity: it is as secret as the
//! coordinator's private key, written 0600 and never logged. Losing it (deleted, corrupt,
//! unreadable) costs only full handshakes: a fresh key is made, with a warning.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use tracing::{info, warn};

/// The key file's name in the data dir.
pub const FILE_NAME: &str = "tls-ticket-keys";
/// How long a client may hold a ticket: the TLS 1.3 maximum.
pub const TICKET_LIFETIME: u32 = 7 * 24 * 3600;
/// A new key seals tickets from this often on.
pub const ROTATE_EVERY: u64 = 24 * 3600;
/// A key opens tickets this long after it was made: the last ticket it sealed (just before
/// the next rotation) lives [`TICKET_LIFETIME`] more.
pub const KEEP_FOR: u64 = TICKET_LIFETIME as u64 + ROTATE_EVERY;

const KEY_LEN: usize = 32;
const HEADER: &str = "# vigil TLS session-ticket keys (docs/security.md): as secret as the \
coordinator's private key. Deleting this file costs each agent one full handshake.";
const LINE_TAG: &str = "v1";
/// The first byte of every ticket: its format.
const TICKET_VERSION: u8 = 1;
const AAD: &[u8] = b"vigil tls ticket v1";
const DERIVE_INFO: &[u8] = b"vigil tls ticket key v1";

/// One stored key: when it was made (unix seconds) and its secret.
#[derive(Clone, PartialEq, Eq)]
struct StoredKey {
    created: u64,
    secret: [u8; KEY_LEN],
}

/// A stored key bound to one CA, ready to seal and open.
struct BoundKey {
    created: u64,
    aead: LessSafeKey,
}

/// The ticketer a coordinator's `ServerConfig` uses: the keys of the data dir's file, bound
/// to the CA the config trusts.
pub struct TicketKeys {
    path: Option<PathBuf>,
    ca_digest: [u8; 32],
    rng: SystemRandom,
    state: Mutex<Keys>,
}

struct Keys {
    stored: Vec<StoredKey>,
    /// Newest first.
    bound: Vec<BoundKey>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets.
        f.debug_struct("TicketKeys")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKeys {
    /// The keys in `dir`'s key file for a config that trusts the CA whose PEM bytes are `ca`;
    /// made (and the file written) when missing, stale or unreadable. `dir` `None`: keys in
    /// memory only (resumption within this process).
    pub fn open(dir: Option<&Path>, ca: &[u8]) -> Self {
        Self::open_at(dir, ca, unix_now())
    }

    fn open_at(dir: Option<&Path>, ca: &[u8], now: u64) -> Self {
        let path = dir.map(|d| d.join(FILE_NAME));
        let stored = match &path {
            Some(p) => read_file(p),
            None => Vec::new(),
        };
        let keys = Self {
            path,
            ca_digest: digest(ca),
            rng: SystemRandom::new(),
            state: Mutex::new(Keys {
                stored: Vec::new(),
                bound: Vec::new(),
            }),
        };
        {
            let mut state = keys.lock();
            keys.install(&mut state, stored);
            keys.rotate_if_due(&mut state, now);
        }
        keys
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `stored` (newest first), bound to this CA.
    fn install(&self, state: &mut Keys, mut stored: Vec<StoredKey>) {
        stored.sort_by_key(|k| std::cmp::Reverse(k.created));
        state.bound = stored
            .iter()
            .filter_map(|k| {
                self.bind(k).map(|aead| BoundKey {
                    created: k.created,
                    aead,
                })
            })
            .collect();
        state.stored = stored;
    }

    fn bind(&self, key: &StoredKey) -> Option<LessSafeKey> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &self.ca_digest);
        let prk = salt.extract(&key.secret);
        let okm = prk.expand(&[DERIVE_INFO], &AES_256_GCM).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Drops keys past [`KEEP_FOR`] and makes a new one when the newest is [`ROTATE_EVERY`]
    /// old (or, after the wall clock stepped back, made in the future); writes the file when
    /// anything changed.
    fn rotate_if_due(&self, state: &mut Keys, now: u64) {
        let keep = |k: &&StoredKey| {
            now.saturating_sub(k.created) < KEEP_FOR && k.created <= now + ROTATE_EVERY
        };
        // Newest first: the first key kept is the newest.
        let due = state.stored.iter().find(keep).is_none_or(|newest| {
            now.saturating_sub(newest.created) >= ROTATE_EVERY || newest.created > now
        });
        // Every ticket sealed comes here: nothing is copied unless something changes.
        if !due && state.stored.iter().all(|k| keep(&k)) {
            return;
        }
        let mut stored: Vec<StoredKey> = state.stored.iter().filter(keep).cloned().collect();
        if due {
            let mut secret = [0u8; KEY_LEN];
            if self.rng.fill(&mut secret).is_err() {
                warn!("TLS session tickets: no randomness for a new key; keeping the old ones");
                return;
            }
            stored.insert(
                0,
                StoredKey {
                    created: now,
                    secret,
                },
            );
        }
        if let Some(path) = &self.path {
            match write_file(path, &stored) {
                Ok(()) => info!(
                    path = %path.display(),
                    keys = stored.len(),
                    "TLS session-ticket keys rotated"
                ),
                Err(e) => warn!(
                    path = %path.display(),
                    error = %e,
                    "TLS session tickets: cannot write the key file; tickets issued now will not \
                     survive a restart (agents then make full handshakes): check the data dir"
                ),
            }
        }
        self.install(state, stored);
    }

    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let mut state = self.lock();
        self.rotate_if_due(&mut state, now);
        let key = state.bound.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.push(TICKET_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        // Sealed where it lies, after the version and nonce: one buffer per ticket.
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                out.get_mut(1 + NONCE_LEN..)?,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn open_ticket(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        let (&version, rest) = ticket.split_first()?;
        if version != TICKET_VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let state = self.lock();
        state
            .bound
            .iter()
            .filter(|k| now.saturating_sub(k.created) < KEEP_FOR)
            .find_map(|k| {
                let mut body = sealed.to_vec();
                let plain = k
                    .aead
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(AAD),
                        &mut body,
                    )
                    .ok()?;
                Some(plain.to_vec())
            })
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_ticket(cipher, unix_now())
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The keys in `path`; none (with a warning) when it is missing, unreadable or damaged: new
/// keys cost only full handshakes.
fn read_file(path: &Path) -> Vec<StoredKey> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(
                path = %path.display(),
                error = %e,
                "TLS session tickets: cannot read the key file; making a new key (agents make \
                 one full handshake each)"
            );
            return Vec::new();
        }
    };
    match parse(&text) {
        Ok(keys) => keys,
        Err(line) => {
            warn!(
                path = %path.display(),
                line,
                "TLS session tickets: the key file is damaged; replacing it with a new key \
                 (agents make one full handshake each)"
            );
            Vec::new()
        }
    }
}

/// `v1 CREATED HEX` lines; `#` comments. Err: the first bad line's number.
fn parse(text: &str) -> Result<Vec<StoredKey>, usize> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let key = (|| {
            if parts.next()? != LINE_TAG {
                return None;
            }
            let created = parts.next()?.parse().ok()?;
            let secret = hex_key(parts.next()?)?;
            parts
                .next()
                .is_none()
                .then_some(StoredKey { created, secret })
        })();
        keys.push(key.ok_or(i + 1)?);
    }
    Ok(keys)
}

fn hex_key(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != KEY_LEN * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes the keys through a temporary file (mode 0600), synced, then renamed over `path`.
fn write_file(path: &Path, keys: &[StoredKey]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = format!("{HEADER}\n");
    for k in keys {
        let hex: String = k.secret.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{LINE_TAG} {} {hex}\n", k.created));
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all().ok();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nca one\n-----END CERTIFICATE-----\n";
    const DAY: u64 = 24 * 3600;
    const T0: u64 = 1_800_000_000;

    #[test]
    fn a_ticket_opens_after_a_restart_from_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = TicketKeys::open_at(Some(dir.path()), CA, T0);
        let ticket = before.seal(b"session state", T0).expect("sealed");
        drop(before);
        let after = TicketKeys::open_at(Some(dir.path()), CA, T0 + 60);
        assert_eq!(
            after.open_ticket(&ticket, T0 + 60).as_deref(),
            Some(&b"session state"[..])
        );
    }

    #[test]
    fn the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        TicketKeys::open_at(Some(dir.path()), CA, T0);
        let mode = std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn another_ca_opens_no_ticket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = TicketKeys::open_at(Some(dir.path()), CA, T0);
        let ticket = keys.seal(b"x", T0).expect("sealed");
        let other = TicketKeys::open_at(Some(dir.path()), b"another CA", T0);
        assert_eq!(other.open_ticket(&ticket, T0), None);
        assert!(keys.open_ticket(&ticket, T0).is_some());
    }

    #[test]
    fn keys_rotate_daily_and_open_tickets_for_the_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = TicketKeys::open_at(Some(dir.path()), CA, T0);
        // Sealed just before the rotation: the oldest ticket the first key must still open.
        let late = keys.seal(b"late", T0 + DAY - 1).expect("sealed");
        let next_day = keys.seal(b"new", T0 + DAY).expect("sealed");
        assert_eq!(keys.lock().stored.len(), 2, "a second key after a day");
        let last_valid = T0 + DAY - 1 + u64::from(TICKET_LIFETIME) - 1;
        assert!(keys.open_ticket(&late, last_valid).is_some());
        assert!(keys.open_ticket(&next_day, last_valid).is_some());
        // Past KEEP_FOR the first key is gone, and the file forgets it at the next rotation.
        assert_eq!(keys.open_ticket(&late, T0 + KEEP_FOR), None);
        keys.seal(b"later", T0 + KEEP_FOR).expect("sealed");
        assert!(keys.lock().stored.iter().all(|k| k.created > T0));
        let reread = parse(&std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("file"))
            .expect("valid file");
        assert!(reread.iter().all(|k| k.created > T0));
    }

    #[test]
    fn a_clock_stepped_back_makes_a_new_key() {
        let keys = TicketKeys::open_at(None, CA, T0 + 10 * DAY);
        keys.seal(b"x", T0).expect("sealed");
        let stored = &keys.lock().stored;
        assert_eq!(stored.first().map(|k| k.created), Some(T0));
    }

    #[test]
    fn a_damaged_file_is_replaced_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, "v1 12 nothex\n").expect("write");
        let keys = TicketKeys::open_at(Some(dir.path()), CA, T0);
        let ticket = keys.seal(b"x", T0).expect("sealed");
        assert!(keys.open_ticket(&ticket, T0).is_some());
        assert!(parse(&std::fs::read_to_string(&path).expect("file")).is_ok());
    }

    #[test]
    fn tampered_or_foreign_tickets_open_nothing() {
        let keys = TicketKeys::open_at(None, CA, T0);
        let ticket = keys.seal(b"session", T0).expect("sealed");
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x40;
            assert_eq!(keys.open_ticket(&bad, T0), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(keys.open_ticket(&ticket[..len], T0), None, "cut to {len}");
        }
        let stranger = TicketKeys::open_at(None, CA, T0);
        assert_eq!(stranger.open_ticket(&ticket, T0), None);
    }

    #[test]
    fn parse_reads_what_write_wrote_and_names_a_bad_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let keys = vec![
            StoredKey {
                created: 5,
                secret: [7; KEY_LEN],
            },
            StoredKey {
                created: 4,
                secret: [0xab; KEY_LEN],
            },
        ];
        write_file(&path, &keys).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(parse(&text), Ok(keys));
        assert_eq!(parse(&format!("{text}v2 1 00\n")), Err(4));
        assert_eq!(parse("v1 1 00 extra\n"), Err(1));
    }

    impl fmt::Debug for StoredKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "StoredKey({})", self.created)
        }
    }
}
