# One-off: derive public JWKs from the PEM test keys via `openssl pkey -text`.
import base64, json, re, subprocess, sys

def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def text(pem):
    return subprocess.run(["openssl", "pkey", "-in", pem, "-noout", "-text"], check=True, capture_output=True, text=True).stdout

def hexblock(t, label):
    m = re.search(label + r":\s*\n((?:\s+[0-9a-f:]+\n)+)", t)
    return bytes.fromhex(re.sub(r"[\s:]", "", m.group(1)))

def rsa(pem, kid):
    t = text(pem)
    n = hexblock(t, "modulus").lstrip(b"\x00")
    e = int(re.search(r"publicExponent: (\d+)", t).group(1))
    return {"kty": "RSA", "kid": kid, "use": "sig", "n": b64u(n), "e": b64u(e.to_bytes((e.bit_length() + 7) // 8, "big"))}

def ec(pem, kid):
    pub = hexblock(text(pem), "pub")
    assert pub[0] == 4 and len(pub) == 65
    return {"kty": "EC", "kid": kid, "crv": "P-256", "x": b64u(pub[1:33]), "y": b64u(pub[33:])}

def ed(pem, kid):
    pub = hexblock(text(pem), "pub")
    assert len(pub) == 32
    return {"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64u(pub)}

keys = {
    "rsa_public.jwk.json": rsa("rsa_private.pem", "rsa-1"),
    "rsa2_public.jwk.json": rsa("rsa2_private.pem", "rsa-2"),
    "ec_public.jwk.json": ec("ec_private.pem", "ec-1"),
    "ed25519_public.jwk.json": ed("ed25519_private.pem", "ed-1"),
}
for name, jwk in keys.items():
    with open(name, "w") as f:
        json.dump(jwk, f, indent=2); f.write("\n")
oct_key = {"kty": "oct", "kid": "hmac-1", "k": b64u(b"a-jwk-oct-secret-that-is-32bytes!")}
with open("oct.jwk.json", "w") as f:
    json.dump(oct_key, f, indent=2); f.write("\n")
jwks = {"keys": [oct_key, keys["rsa_public.jwk.json"], keys["rsa2_public.jwk.json"], keys["ec_public.jwk.json"], keys["ed25519_public.jwk.json"]]}
with open("jwks.json", "w") as f:
    json.dump(jwks, f, indent=2); f.write("\n")
