//! `pgws-token`: prints a JWT that a pgws stack accepts, for trying a stack or scripting one.
//!
//! ```text
//! pgws-token --channels chat --mode rw --exp 1h --claim sub=alice
//! pgws-token --role web_user --sub ann                       # a /live token
//! pgws-token --key private.pem --alg RS256 --kid k1 --mode r  # for a stack on PGWS_JWKS_URL
//! ```
//!
//! Claims: `--channels a,b` (`channels`), `--channel c` (`channel`), `--mode r|w|rw`, `--sub`,
//! `--role`, `--claim key=value` (repeatable; a value that reads as JSON is JSON, otherwise a
//! string; it overrides the options above), `iat` = now, `exp` = now + `--exp` (`90s`, `30m`,
//! `1h`, `7d`, plain seconds; default `1h`; `never` leaves `exp` out).
//!
//! Signing: `--key <PEM file>` with `--alg` (RS256/384/512, PS256/384/512, ES256/384, EdDSA)
//! and optional `--kid`; otherwise HMAC (`--alg` HS256, the default, HS384 or HS512) with
//! `--secret` (`@path` reads a file), else the stack's own settings: `PGWS_JWT_SECRET` (and
//! `PGWS_JWT_SECRET_BASE64`) from the environment or `PGWS_CONFIG_FILE`, as the gateway reads
//! them. A secret that is a JWK document needs `--key` instead. The public sample secret of
//! `deploy/sample.env` and the compose stack is refused unless `--local` says the token is
//! for a local stack.
//!
//! Exit status: 0 with the token on stdout; 2 for a usage error; 1 when it cannot sign.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgws_config::{keys, Problems, Settings};
use serde_json::{Map, Value};

/// The secret of `deploy/sample.env` and the compose stack: public, for local use only.
pub const SAMPLE_SECRET: &str = "reallyreallyreallyreallyverysafe";

/// Default lifetime, in seconds.
const DEFAULT_EXP: u64 = 3600;

const USAGE: &str = "usage: pgws-token [--channels a,b] [--channel c] [--mode r|w|rw] [--sub S] [--role R]
                  [--claim key=value]... [--exp 1h|30m|90s|7d|SECONDS|never]
                  [--secret S|@file [--base64] | --key PEM --alg ALG [--kid ID]] [--alg HS256|HS384|HS512]
                  [--local]
Prints a token for a pgws stack; without --secret or --key it signs with PGWS_JWT_SECRET as the
gateway reads it. --local allows the public sample secret (local stacks only).";

/// What the command line asks for.
#[derive(Debug, Default, PartialEq)]
pub struct Options {
    pub claims: Map<String, Value>,
    /// Seconds from now; `None`: no `exp`.
    pub exp: Option<u64>,
    pub secret: Option<String>,
    pub base64: bool,
    pub key: Option<String>,
    pub alg: Option<Algorithm>,
    pub kid: Option<String>,
    pub local: bool,
    pub help: bool,
}

/// Reads the command line.
pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        exp: Some(DEFAULT_EXP),
        ..Options::default()
    };
    let mut extra = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "--channels" => {
                let list: Vec<Value> = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(Value::from)
                    .collect();
                if list.is_empty() {
                    return Err("--channels needs at least one channel".to_owned());
                }
                o.claims.insert("channels".into(), Value::Array(list));
            }
            "--channel" => {
                o.claims.insert("channel".into(), Value::from(value()?));
            }
            "--mode" => {
                let mode = value()?;
                if !["r", "w", "rw"].contains(&mode.as_str()) {
                    return Err(format!("--mode {mode:?}: r, w or rw"));
                }
                o.claims.insert("mode".into(), Value::from(mode));
            }
            "--sub" => {
                o.claims.insert("sub".into(), Value::from(value()?));
            }
            "--role" => {
                o.claims.insert("role".into(), Value::from(value()?));
            }
            "--claim" => {
                let pair = value()?;
                let (k, v) = pair
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("--claim {pair:?}: key=value"))?;
                let v = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
                extra.push((k.to_owned(), v));
            }
            "--exp" => o.exp = parse_exp(&value()?)?,
            "--secret" => o.secret = Some(value()?),
            "--base64" => o.base64 = true,
            "--key" => o.key = Some(value()?),
            "--alg" => {
                let alg = value()?;
                o.alg = Some(alg.parse().map_err(|_| format!("--alg {alg:?}: unknown"))?);
            }
            "--kid" => o.kid = Some(value()?),
            "--local" => o.local = true,
            "-h" | "--help" => o.help = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // `--claim` wins over the options that set the same claim.
    o.claims.extend(extra);
    if o.key.is_some() && o.secret.is_some() {
        return Err("--key and --secret: one of them".to_owned());
    }
    Ok(o)
}

/// `90s`, `30m`, `1h`, `7d`, plain seconds, or `never`.
pub fn parse_exp(text: &str) -> Result<Option<u64>, String> {
    if text == "never" {
        return Ok(None);
    }
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = digits.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        format!("--exp {text:?}: a positive duration (90s, 30m, 1h, 7d) or never")
    })?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("--exp {text:?}: units are s, m, h and d")),
    };
    n.checked_mul(scale)
        .map(Some)
        .ok_or_else(|| format!("--exp {text:?}: too long"))
}

/// The claims of the token issued at `now` (unix seconds).
pub fn claims(o: &Options, now: u64) -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("iat".into(), Value::from(now));
    if let Some(exp) = o.exp {
        claims.insert("exp".into(), Value::from(now.saturating_add(exp)));
    }
    claims.extend(o.claims.clone());
    claims
}

/// The key and header to sign with: `--key`, `--secret`, or the stack's settings in `env`.
pub fn signer<I, K, V>(o: &Options, env: I) -> Result<(EncodingKey, Header), String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    if let Some(path) = &o.key {
        let pem = std::fs::read(path).map_err(|e| format!("--key {path:?}: {e}"))?;
        let alg = o
            .alg
            .ok_or("--key needs --alg (RS256, ES256, EdDSA, ...)")?;
        let key = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => return Err(format!("--alg {alg:?} is not for a key file")),
        }
        .map_err(|e| format!("--key {path:?}: not a {alg:?} private key in PEM: {e}"))?;
        let mut header = Header::new(alg);
        header.kid = o.kid.clone();
        return Ok((key, header));
    }
    let alg = o.alg.unwrap_or(Algorithm::HS256);
    if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(format!("--alg {alg:?} needs --key"));
    }
    let (secret, base64) = match &o.secret {
        Some(s) => (read_secret(s)?, o.base64),
        None => stack_secret(env)?,
    };
    if secret == SAMPLE_SECRET && !o.local {
        return Err(
            "refusing to sign with the public sample secret of deploy/sample.env: \
                    pass --local for a local stack, or set your own PGWS_JWT_SECRET"
                .to_owned(),
        );
    }
    if secret.trim_start().starts_with('{') {
        return Err(
            "the secret is a JWK document: sign with the private key (--key) instead".to_owned(),
        );
    }
    let bytes = pgws_auth::hmac_secret(&secret, base64).map_err(|e| e.to_string())?;
    let mut header = Header::new(alg);
    header.kid = o.kid.clone();
    Ok((EncodingKey::from_secret(&bytes), header))
}

fn read_secret(value: &str) -> Result<String, String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("--secret @{path}: {e}")),
        None => Ok(value.to_owned()),
    }
}

/// `PGWS_JWT_SECRET` and `PGWS_JWT_SECRET_BASE64` as the gateway reads them.
fn stack_secret<I, K, V>(env: I) -> Result<(String, bool), String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let settings = Settings::load(env).map_err(|e| e.to_string())?;
    let mut p = Problems::new(&settings);
    let base64 = p.flag(keys::JWT_SECRET_BASE64);
    let secret = p.secret(keys::JWT_SECRET);
    let jwks = p.text(keys::JWKS_URL);
    p.finish(())
        .map_err(|e| e.to_string())
        .and_then(|()| match (secret, jwks) {
            (Some(s), _) => Ok((s, base64)),
            (None, Some(_)) => Err(
                "the stack verifies tokens with PGWS_JWKS_URL: sign with your \
                                    identity provider's private key (--key and --alg)"
                    .to_owned(),
            ),
            (None, None) => {
                Err("no secret: pass --secret or --key, or set PGWS_JWT_SECRET".to_owned())
            }
        })
}

/// The token for `args`, or the message and exit status of why not.
pub fn token<I, K, V>(args: &[String], env: I, now: u64) -> Result<String, (String, i32)>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let o = parse(args).map_err(|e| (format!("pgws-token: {e}\n{USAGE}"), 2))?;
    if o.help {
        return Err((USAGE.to_owned(), 0));
    }
    let (key, header) = signer(&o, env).map_err(|e| (format!("pgws-token: {e}"), 1))?;
    let claims: BTreeMap<String, Value> = claims(&o, now).into_iter().collect();
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| (format!("pgws-token: cannot sign: {e}"), 1))
}

/// The command: prints the token (or the error) and returns the exit status.
pub fn run<I, K, V>(args: &[String], env: I) -> i32
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match token(args, env, now) {
        Ok(t) => {
            println!("{t}");
            0
        }
        Err((message, 0)) => {
            println!("{message}");
            0
        }
        Err((message, code)) => {
            eprintln!("{message}");
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    const OWN: &str = "an-own-secret-of-more-than-32-bytes!";

    #[test]
    fn options_become_claims() {
        let o = parse(&args(&[
            "--channels",
            "chat, room",
            "--mode=rw",
            "--exp",
            "30m",
            "--claim",
            "sub=alice",
            "--claim",
            "n=7",
            "--claim",
            "mode=r",
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(claims(&o, 1000)),
            json!({"iat": 1000, "exp": 2800, "channels": ["chat", "room"], "mode": "r",
                   "sub": "alice", "n": 7})
        );
        let o = parse(&args(&["--exp", "never", "--role", "web", "--sub", "ann"])).unwrap();
        assert_eq!(
            Value::Object(claims(&o, 5)),
            json!({"iat": 5, "role": "web", "sub": "ann"})
        );
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        for (bad, needle) in [
            (&["--mode", "x"][..], "r, w or rw"),
            (&["--exp", "0"], "positive duration"),
            (&["--exp", "5y"], "units"),
            (&["--claim", "=x"], "key=value"),
            (&["--channels", ","], "at least one"),
            (&["--alg", "XX1"], "unknown"),
            (&["--what"], "unknown argument"),
            (&["--sub"], "needs a value"),
            (&["--key", "k.pem", "--secret", "s"], "one of them"),
        ] {
            let e = parse(&args(bad)).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
        assert_eq!(parse_exp("7d"), Ok(Some(604_800)));
        assert_eq!(parse_exp("90"), Ok(Some(90)));
    }

    #[test]
    fn the_sample_secret_needs_local() {
        let env = [("PGWS_JWT_SECRET", SAMPLE_SECRET)];
        let refused = token(&args(&["--mode", "r"]), env, 0).unwrap_err();
        assert_eq!(refused.1, 1);
        assert!(refused.0.contains("--local"), "{}", refused.0);
        assert!(token(&args(&["--mode", "r", "--local"]), env, 0).is_ok());
        let none = token(&args(&[]), [("PGWS_X", "1")], 0).unwrap_err();
        assert!(none.0.contains("no secret"), "{}", none.0);
        let jwks = token(&args(&[]), [("PGWS_JWKS_URL", "https://idp/jwks")], 0).unwrap_err();
        assert!(jwks.0.contains("--key"), "{}", jwks.0);
    }

    #[test]
    fn tokens_verify_with_the_stacks_secret() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let env = [("PGWS_JWT_SECRET", OWN)];
        let t = token(
            &args(&["--channels", "chat", "--mode", "rw", "--claim", "sub=alice"]),
            env,
            now,
        )
        .unwrap();
        let auth = pgws_auth::Authorizer::from_secret(OWN, false).unwrap();
        let verified = auth.verify(&t, now).expect("accepted");
        assert_eq!(verified.claims["sub"], "alice");
        assert_eq!(verified.claims["channels"], json!(["chat"]));
        // Base64 secrets, as PGWS_JWT_SECRET_BASE64 reads them.
        let encoded = base64::engine::general_purpose::STANDARD.encode(OWN);
        let t = token(
            &args(&["--secret", &encoded, "--base64", "--mode", "r"]),
            [("PGWS_X", "1")],
            now,
        )
        .unwrap();
        let auth = pgws_auth::Authorizer::from_secret(&encoded, true).unwrap();
        assert!(auth.verify(&t, now).is_ok());
        // Another secret's token is refused.
        let other = pgws_auth::Authorizer::from_secret("another-secret-entirely-xxxxxxxxxx", false)
            .unwrap();
        assert!(other.verify(&t, now).is_err());
    }

    #[test]
    fn a_key_file_signs_with_its_algorithm_and_kid() {
        // An EC key pair made by openssl, as an operator would.
        let dir = std::env::temp_dir().join(format!("pgws-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("ec.pem");
        let public = dir.join("ec.pub.pem");
        let sh = format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out {p} \
             && openssl ec -in {p} -pubout -out {q}",
            p = private.display(),
            q = public.display()
        );
        let made = std::process::Command::new("sh").args(["-c", &sh]).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "openssl could not make a key"
        );
        let key = private.to_string_lossy().into_owned();
        let t = token(
            &args(&[
                "--key", &key, "--alg", "ES256", "--kid", "k1", "--mode", "r",
            ]),
            [("PGWS_X", "1")],
            100,
        )
        .unwrap();
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::ES256, Some("k1"))
        );
        let decoding =
            jsonwebtoken::DecodingKey::from_ec_pem(&std::fs::read(&public).unwrap()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(&t, &decoding, &validation).expect("verifies");
        assert_eq!(data.claims["mode"], "r");
        // The wrong algorithm for the key, and no algorithm: refused with the reason.
        let wrong = token(
            &args(&["--key", &key, "--alg", "RS256"]),
            [("PGWS_X", "1")],
            0,
        );
        assert!(wrong.unwrap_err().0.contains("not a RS256 private key"));
        let none = token(&args(&["--key", &key]), [("PGWS_X", "1")], 0);
        assert!(none.unwrap_err().0.contains("--alg"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
