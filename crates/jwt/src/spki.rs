//! Public keys from PEM `PUBLIC KEY` blocks (X.509 SubjectPublicKeyInfo), for issuers
//! configured with a static key instead of a JWKS. Only the three key types Tessera
//! verifies are read: Ed25519, P-256 and RSA; the key type decides the one algorithm the
//! key may check.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::{Alg, JwtError, Key, Material};

const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

fn bad(why: &str) -> JwtError {
    JwtError::Key(format!("not a usable public key: {why}"))
}

/// One DER element: (tag, contents, rest).
fn element(der: &[u8]) -> Result<(u8, &[u8], &[u8]), JwtError> {
    let (&tag, rest) = der.split_first().ok_or_else(|| bad("truncated"))?;
    let (&first, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 || rest.len() < n {
            return Err(bad("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(bad("truncated"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect(der: &[u8], want: u8) -> Result<(&[u8], &[u8]), JwtError> {
    let (tag, body, rest) = element(der)?;
    if tag != want {
        return Err(bad("unexpected structure"));
    }
    Ok((body, rest))
}

/// An unsigned DER INTEGER without its sign byte.
fn unsigned(int: &[u8]) -> &[u8] {
    match int {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => int,
    }
}

impl Key {
    /// The key in a PEM `PUBLIC KEY` block.
    pub fn from_public_pem(kid: Option<String>, pem: &str) -> Result<Key, JwtError> {
        let mut inside = false;
        let mut b64 = String::new();
        for line in pem.lines().map(str::trim) {
            match line {
                "-----BEGIN PUBLIC KEY-----" => inside = true,
                "-----END PUBLIC KEY-----" if inside => {
                    let der = STANDARD
                        .decode(b64.as_bytes())
                        .map_err(|_| bad("the PEM block is not base64"))?;
                    return Key::from_spki_der(kid, &der);
                }
                l if inside => b64.push_str(l),
                _ => {}
            }
        }
        Err(bad("no -----BEGIN PUBLIC KEY----- block"))
    }

    /// The key in a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(kid: Option<String>, der: &[u8]) -> Result<Key, JwtError> {
        let (spki, trailing) = expect(der, 0x30)?;
        if !trailing.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let (algorithm, rest) = expect(spki, 0x30)?;
        let (bits, _) = expect(rest, 0x03)?;
        let key = match bits.split_first() {
            Some((0, key)) => key,
            _ => return Err(bad("bad BIT STRING")),
        };
        let (oid, params) = expect(algorithm, 0x06)?;
        let (alg, material) = if oid == OID_ED25519 {
            if key.len() != 32 {
                return Err(bad("an Ed25519 key is 32 bytes"));
            }
            (Alg::EdDSA, Material::Ed25519(key.to_vec()))
        } else if oid == OID_EC_PUBLIC_KEY {
            let (curve, _) = expect(params, 0x06)?;
            if curve != OID_P256 {
                return Err(bad("only the P-256 curve is supported"));
            }
            if key.len() != 65 || key[0] != 4 {
                return Err(bad("a P-256 key is an uncompressed 65-byte point"));
            }
            (Alg::ES256, Material::P256(key.to_vec()))
        } else if oid == OID_RSA {
            let (rsa, _) = expect(key, 0x30)?;
            let (n, rest) = expect(rsa, 0x02)?;
            let (e, _) = expect(rest, 0x02)?;
            let n = unsigned(n);
            if n.len() < 256 {
                return Err(bad("RSA keys shorter than 2048 bits are refused"));
            }
            (
                Alg::RS256,
                Material::Rsa {
                    n: n.to_vec(),
                    e: unsigned(e).to_vec(),
                },
            )
        } else {
            return Err(bad("the key type is not Ed25519, P-256 or RSA"));
        };
        Ok(Key { kid, alg, material })
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::KeyPair;

    use super::*;

    fn pem(der: &[u8]) -> String {
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn ed25519_and_p256_keys_read_from_pem() {
        let rng = ring::rand::SystemRandom::new();
        let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = ring::signature::Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap();
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(ed.public_key().as_ref());
        let key = Key::from_public_pem(Some("k".into()), &pem(&der)).unwrap();
        assert_eq!(key.alg, Alg::EdDSA);
        assert!(key.fits(Alg::EdDSA) && !key.fits(Alg::HS256));

        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let p = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let p = ring::signature::EcdsaKeyPair::from_pkcs8(alg, p.as_ref(), &rng).unwrap();
        let mut der = vec![0x30, 0x59, 0x30, 0x13, 0x06, 0x07];
        der.extend_from_slice(OID_EC_PUBLIC_KEY);
        der.extend_from_slice(&[0x06, 0x08]);
        der.extend_from_slice(OID_P256);
        der.extend_from_slice(&[0x03, 0x42, 0x00]);
        der.extend_from_slice(p.public_key().as_ref());
        assert_eq!(
            Key::from_public_pem(None, &pem(&der)).unwrap().alg,
            Alg::ES256
        );
    }

    #[test]
    fn malformed_keys_are_errors_not_panics() {
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0, 0, 0, 1],
            &[0x30, 0x05, 0x30, 0x03, 0x06, 0x01, 0x2a],
            &[
                0x30, 0x0a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x01, 0x00,
            ],
        ] {
            assert!(Key::from_spki_der(None, der).is_err(), "{der:?}");
        }
        assert!(
            Key::from_public_pem(
                None,
                "-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----"
            )
            .is_err()
        );
        assert!(Key::from_public_pem(None, "no pem here").is_err());
    }
}
