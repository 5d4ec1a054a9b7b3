"""JWT bearer tokens: pinned algorithms, key selection, claims -> principal, and config errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from llmrouter.accounts.jwt import JwtAuthenticator
from llmrouter.accounts.principal import Principal
from llmrouter.errors import AuthenticationFailed
from llmrouter.settings import ConfigError, JwtIssuer, Policy

AUD = "llmrouter"
SECRET = "an-hmac-secret-of-at-least-32-bytes"
HS, RS, ES = "https://hs.example", "https://rs.example", "https://es.example"
JWKS, BAD = "https://jwks.example", "https://bad.example"
BAD_SIGNATURE = "JWT signature or algorithm is not accepted."
POLICIES = {
    "free": Policy(rpm=10, tpm=1000, models=frozenset({"small"})),
    "gold": Policy(rpm=100, tpm=100_000, max_concurrent=8, credit_limit=50.0, reset="monthly"),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_jwk(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": kid, "use": "sig"}


def claims(iss: str = HS, *, drop: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    base = {"iss": iss, "aud": AUD, "sub": "alice", "exp": int(time.time()) + 300, **extra}
    return {k: v for k, v in base.items() if k not in drop}


def sign(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", kid: str | None = None) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def hs256_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made without PyJWT, which refuses a PEM as HMAC secret."""
    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{b64(header)}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def tamper(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    changed = {**json.loads(unb64(payload)), **changes}
    return f"{header}.{b64(json.dumps(changed).encode())}.{signature}"


def reject(auth: JwtAuthenticator, token: str, message: str = "") -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(token)
    error = info.value
    assert error.status == 401 and error.code == "invalid_token"
    assert message in error.message
    assert not token or token not in error.message  # never echoed
    return error


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def keydir(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> Path:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 -- must be refused
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    oct_jwk = {"kty": "oct", "k": b64(SECRET.encode()), "kid": "h"}
    files: dict[str, bytes | dict[str, Any]] = {
        "rs.pem": public_pem(rsa_key),
        "es.pem": public_pem(ec_key),
        "weak.pem": public_pem(weak),
        "private.pem": private,
        "garbage.pem": b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
        "jwks.json": {
            "keys": [rsa_jwk(rsa_key.public_key(), "k1"), rsa_jwk(rsa_key2.public_key(), "k2")]
        },
        "jwks-nokid.json": {"keys": [{**rsa_jwk(rsa_key.public_key(), "k1"), "kid": None}]},
        "jwks-dupkid.json": {
            "keys": [rsa_jwk(rsa_key.public_key(), "k1"), rsa_jwk(rsa_key2.public_key(), "k1")]
        },
        "jwks-private.json": {"keys": [rsa_jwk(rsa_key, "k1")]},
        "jwks-oct.json": {"keys": [oct_jwk]},
        "jwks-enc.json": {"keys": [{**rsa_jwk(rsa_key.public_key(), "k1"), "use": "enc"}]},
        "jwks-list.json": b"[]",
        "not-json.json": b"{keys:",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(
            content if isinstance(content, bytes) else json.dumps(content).encode()
        )
    return tmp_path


def issuer(iss: str = HS, algorithms: tuple[Any, ...] = ("HS256",), **settings: Any) -> JwtIssuer:
    if not any(k in settings for k in ("secret", "public_key_file", "jwks_file")):
        settings["secret"] = SECRET
    return JwtIssuer(issuer=iss, audience=AUD, algorithms=frozenset(algorithms), **settings)


STANDARD = [
    issuer(HS),
    issuer(RS, ("RS256",), public_key_file="rs.pem"),
    issuer(ES, ("ES256",), public_key_file="es.pem"),
    issuer(JWKS, ("RS256",), jwks_file="jwks.json"),
]


@pytest.fixture
def auth(keydir: Path) -> JwtAuthenticator:
    return JwtAuthenticator(STANDARD, POLICIES, base_dir=keydir)


# -- accepted ------------------------------------------------------------------------------------


def test_hs256_token_becomes_a_jwt_principal(auth: JwtAuthenticator) -> None:
    payload = claims(HS)
    principal = auth.authenticate(sign(payload))
    assert principal == Principal(
        id=f"jwt:{HS} alice", kind="jwt", name="alice", limits=Policy(), expires_at=payload["exp"]
    )
    assert principal.admin is False and principal.may_use("anything")


@pytest.mark.parametrize(
    ("iss", "key_fixture", "alg"), [(RS, "rsa_key", "RS256"), (ES, "ec_key", "ES256")]
)
def test_asymmetric_tokens_are_accepted(
    auth: JwtAuthenticator, request: pytest.FixtureRequest, iss: str, key_fixture: str, alg: str
) -> None:
    token = sign(claims(iss, sub="bob"), request.getfixturevalue(key_fixture), alg)
    assert auth.authenticate(token).id == f"jwt:{iss} bob"


def test_jwks_key_is_chosen_by_kid(
    auth: JwtAuthenticator, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    assert auth.authenticate(sign(claims(JWKS), rsa_key, "RS256", kid="k1")).name == "alice"
    assert auth.authenticate(sign(claims(JWKS), rsa_key2, "RS256", kid="k2")).name == "alice"
    reject(auth, sign(claims(JWKS), rsa_key2, "RS256", kid="k1"), BAD_SIGNATURE)
    reject(auth, sign(claims(JWKS), rsa_key, "RS256", kid="k3"), "kid")
    reject(auth, sign(claims(JWKS), rsa_key, "RS256"), "kid")


def test_expired_within_leeway_is_accepted_and_beyond_it_is_not() -> None:
    auth = JwtAuthenticator([issuer(HS, leeway_seconds=30)], {})
    now = int(time.time())
    assert auth.authenticate(sign(claims(HS, exp=now - 10))).expires_at == now - 10
    reject(auth, sign(claims(HS, exp=now - 50)), "JWT expired.")


def test_nbf_in_the_past_is_accepted(auth: JwtAuthenticator) -> None:
    assert auth.authenticate(sign(claims(HS, nbf=int(time.time()) - 60))).name == "alice"


def test_audience_list_containing_ours_is_accepted(auth: JwtAuthenticator) -> None:
    assert auth.authenticate(sign(claims(HS, aud=["other", AUD]))).name == "alice"


def test_algorithm_is_pinned_within_a_family_too(keydir: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(claims(RS), rsa_key, "PS256")
    reject(JwtAuthenticator(STANDARD, {}, base_dir=keydir), token, BAD_SIGNATURE)
    both = issuer(RS, ("RS256", "PS256"), public_key_file="rs.pem")
    assert JwtAuthenticator([both], {}, base_dir=keydir).authenticate(token).name == "alice"


def test_keys_are_read_once_at_start(keydir: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = JwtAuthenticator(STANDARD, {}, base_dir=keydir)
    for name in ("rs.pem", "es.pem", "jwks.json"):
        (keydir / name).unlink()
    assert auth.authenticate(sign(claims(RS), rsa_key, "RS256")).name == "alice"
    assert auth.authenticate(sign(claims(JWKS), rsa_key, "RS256", kid="k1")).name == "alice"


def test_configured_claim_names_are_used() -> None:
    custom = issuer(HS, subject_claim="email", models_claim="allowed", policy_claim="tier")
    auth = JwtAuthenticator([custom], POLICIES)
    payload = claims(HS, drop=("sub",), email="a@example.com", allowed=["m"], tier="gold")
    principal = auth.authenticate(sign(payload))
    assert principal.id == f"jwt:{HS} a@example.com" and principal.name == "a@example.com"
    assert principal.limits.models == frozenset({"m"}) and principal.limits.rpm == 100
    reject(auth, sign(claims(HS)), "'email'")


# -- rejected: signature and algorithm ----------------------------------------------------------


@pytest.mark.parametrize("iss", [HS, RS, JWKS])
def test_unsigned_alg_none_token_is_rejected(auth: JwtAuthenticator, iss: str) -> None:
    token = jwt.encode(claims(iss), "", algorithm="none", headers={"kid": "k1"})
    assert token.endswith(".")  # really unsigned
    reject(auth, token, BAD_SIGNATURE)


def test_hs256_signed_with_the_public_key_is_rejected(
    auth: JwtAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The hand-made token is sound: signed with the HS issuer's secret, it is accepted.
    assert auth.authenticate(hs256_by_hand(claims(HS), SECRET.encode())).name == "alice"
    reject(auth, hs256_by_hand(claims(RS), public_pem(rsa_key)), BAD_SIGNATURE)


def test_rs256_token_is_rejected_by_an_hs256_issuer(
    auth: JwtAuthenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    reject(auth, sign(claims(HS), rsa_key, "RS256"), BAD_SIGNATURE)


@pytest.mark.parametrize("iss", [HS, RS])
def test_tampered_payload_is_rejected(
    auth: JwtAuthenticator, rsa_key: rsa.RSAPrivateKey, iss: str
) -> None:
    token = sign(claims(iss), SECRET if iss == HS else rsa_key, "HS256" if iss == HS else "RS256")
    reject(auth, tamper(token, sub="mallory"), BAD_SIGNATURE)


def test_token_signed_by_another_issuers_key_is_rejected(
    auth: JwtAuthenticator, rsa_key2: rsa.RSAPrivateKey
) -> None:
    reject(auth, sign(claims(RS), rsa_key2, "RS256"), BAD_SIGNATURE)
    reject(auth, sign(claims(HS), "another-secret-that-is-32-bytes-long"), BAD_SIGNATURE)


# -- rejected: claims ----------------------------------------------------------------------------


def test_expired_token_is_rejected(auth: JwtAuthenticator) -> None:
    reject(auth, sign(claims(HS, exp=int(time.time()) - 5)), "JWT expired.")


def test_token_not_yet_valid_is_rejected(auth: JwtAuthenticator) -> None:
    reject(auth, sign(claims(HS, nbf=int(time.time()) + 60)), "JWT is not valid yet.")


@pytest.mark.parametrize("claim", ["exp", "sub", "aud"])
def test_required_claim_missing_is_rejected(auth: JwtAuthenticator, claim: str) -> None:
    reject(auth, sign(claims(HS, drop=(claim,))), f"required claim '{claim}'")


def test_wrong_audience_is_rejected(auth: JwtAuthenticator) -> None:
    reject(auth, sign(claims(HS, aud="someone-else")), "JWT audience is not accepted.")


@pytest.mark.parametrize("iss", ["https://evil.example", HS + "/", 42, None])
def test_unknown_or_missing_issuer_is_rejected(auth: JwtAuthenticator, iss: Any) -> None:
    payload = claims(iss) if iss is not None else claims(HS, drop=("iss",))
    reject(auth, hs256_by_hand(payload, SECRET.encode()), "JWT issuer is not accepted.")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b.c",
        "....",
        "x" * 200_000,
        "a." * 50_000,
        "é.é.é",
        "\ud800.e30.e30",  # a lone surrogate: UnicodeEncodeError inside PyJWT, not a PyJWTError
        "Bearer e30.e30.",
        b64(b'{"alg":"HS256"}') + "." + b64(b"[1, 2]") + ".sig",
        b64(b'{"alg":"HS256"}') + "." + b64(b'{"iss":"' + HS.encode() + b'"}') + "." + "*" * 43,
        b64(b"[") + "." + b64(b"{") + ".",
        b64(b"[" * 100_000) + ".e30.",
    ],
)
def test_garbage_is_a_401_never_a_500(auth: JwtAuthenticator, token: str) -> None:
    reject(auth, token)


@pytest.mark.parametrize("token", ["", "a.b.c", "e30.e30", "x" * 10_000])
def test_malformed_token_says_so(auth: JwtAuthenticator, token: str) -> None:
    reject(auth, token, "JWT is malformed.")


@pytest.mark.parametrize(
    "extra",
    [
        {"exp": [1]},
        {"exp": "soon"},
        {"iat": "x"},
        {"nbf": {}},
        {"sub": 123},
        {"sub": ""},
        {"sub": "nul\x00inside"},  # PostgreSQL text cannot hold it, nor a principal id
        {"aud": [1]},
    ],
)
def test_signed_claims_of_the_wrong_shape_are_a_401(
    auth: JwtAuthenticator, extra: dict[str, Any]
) -> None:
    reject(auth, sign(claims(HS, **extra)))


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("rpm", "60"),
        ("rpm", -1),
        ("rpm", True),
        ("tpm", 1.5),
        ("max_concurrent", "2"),
        ("credit_limit", "5"),
        ("credit_limit", -0.5),
        ("credit_limit", 1e300),  # must stay finite and exact as nano-units
        ("rpm", 2**60),
        ("reset", "hourly"),
        ("models", "small"),
        ("models", ["small", 1]),
        ("policy", 5),
    ],
)
def test_limit_claim_of_the_wrong_type_is_rejected_by_name(
    auth: JwtAuthenticator, claim: str, value: Any
) -> None:
    error = reject(auth, sign(claims(HS, **{claim: value})), f"JWT claim '{claim}'")
    assert str(value) not in error.message


def test_unknown_policy_is_rejected(auth: JwtAuthenticator) -> None:
    reject(auth, sign(claims(HS, policy="platinum")), "unknown policy")


# -- claims -> limits ----------------------------------------------------------------------------


def test_claims_set_limits_and_models(auth: JwtAuthenticator) -> None:
    payload = claims(
        HS, rpm=60, tpm=6000, max_concurrent=2, credit_limit=5, reset="weekly", models=["a", "b"]
    )
    principal = auth.authenticate(sign(payload))
    assert principal.limits == Policy(
        rpm=60,
        tpm=6000,
        max_concurrent=2,
        credit_limit=5.0,
        reset="weekly",
        models=frozenset({"a", "b"}),
    )
    assert isinstance(principal.limits.credit_limit, float)
    assert principal.may_use("a") and not principal.may_use("c")


def test_policy_comes_from_the_claim_else_the_default_and_claims_override_it() -> None:
    auth = JwtAuthenticator([issuer(HS, default_policy="free")], POLICIES)
    assert auth.authenticate(sign(claims(HS))).limits == POLICIES["free"]
    assert auth.authenticate(sign(claims(HS, policy="gold"))).limits == POLICIES["gold"]
    overridden = auth.authenticate(sign(claims(HS, policy="gold", rpm=5, models=["big"]))).limits
    assert overridden == Policy(
        rpm=5,
        tpm=100_000,
        max_concurrent=8,
        credit_limit=50.0,
        reset="monthly",
        models=frozenset({"big"}),
    )


def test_limit_claims_off_ignores_limit_claims_but_not_models() -> None:
    auth = JwtAuthenticator([issuer(HS, limit_claims=False)], POLICIES)
    limits = auth.authenticate(sign(claims(HS, policy="gold", rpm="junk", tpm=1, models=["m"]))).limits
    assert limits.rpm == 100 and limits.tpm == 100_000 and limits.models == frozenset({"m"})


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "settings", "fragment"),
    [
        (("HS256",), {"secret": None}, "exactly one of"),
        (("HS256",), {"secret": SECRET, "public_key_file": "rs.pem"}, "exactly one of"),
        (("RS256",), {"public_key_file": "rs.pem", "jwks_file": "jwks.json"}, "exactly one of"),
        (("HS256", "RS256"), {"secret": SECRET}, "mix"),
        (("RS256", "ES256"), {"jwks_file": "jwks.json"}, "mix"),
        (("none",), {"secret": SECRET}, "unsupported algorithm 'none'"),
        (("HS256",), {"public_key_file": "rs.pem"}, "HS256 needs an HMAC secret"),
        (("RS256",), {"secret": SECRET}, "RS256 needs an RSA public key"),
        (("PS256",), {"public_key_file": "es.pem"}, "PS256 needs an RSA public key"),
        (("ES256",), {"public_key_file": "rs.pem"}, "ES256 needs an EC public key"),
        (("ES384",), {"public_key_file": "es.pem"}, "does not fit ES384"),
        (("ES256",), {"jwks_file": "jwks.json"}, "ES256 needs an EC public key"),
        (("HS256",), {"secret": "short"}, "too weak for HS256"),
        (("HS512",), {"secret": SECRET}, "too weak for HS512"),
        (
            ("HS256",),
            {"secret": public_pem(rsa.generate_private_key(65537, 2048)).decode()},
            "does not fit",
        ),
        (("RS256",), {"public_key_file": "weak.pem"}, "too weak for RS256"),
        (("RS256",), {"public_key_file": "missing.pem"}, "cannot read"),
        (("RS256",), {"public_key_file": "garbage.pem"}, "not a PEM public key"),
        (("RS256",), {"public_key_file": "private.pem"}, "not a PEM public key"),
        (("RS256",), {"jwks_file": "not-json.json"}, "not a JWKS"),
        (("RS256",), {"jwks_file": "jwks-list.json"}, "not a JWKS"),
        (("RS256",), {"jwks_file": "jwks-nokid.json"}, "has no kid"),
        (("RS256",), {"jwks_file": "jwks-dupkid.json"}, "used before"),
        (("RS256",), {"jwks_file": "jwks-private.json"}, "not an RSA or EC public key"),
        (("HS256",), {"jwks_file": "jwks-oct.json"}, "not an RSA or EC public key"),
        (("RS256",), {"jwks_file": "jwks-enc.json"}, "no signing keys"),
    ],
)
def test_config_errors_name_the_issuer(
    keydir: Path, algorithms: tuple[str, ...], settings: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        JwtAuthenticator([issuer(HS), issuer(BAD, algorithms, **settings)], POLICIES, base_dir=keydir)
    message = str(info.value)
    assert f"accounts.jwt[1] (issuer '{BAD}')" in message
    assert fragment in message and "\n" not in message


def test_unknown_default_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"accounts.jwt\[0\].*default_policy 'platinum'"):
        JwtAuthenticator([issuer(HS, default_policy="platinum")], POLICIES)


def test_duplicate_issuer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"accounts.jwt\[1\].*configured twice"):
        JwtAuthenticator([issuer(HS), issuer(HS, secret=SECRET + "-other")], POLICIES)


def test_relative_key_files_resolve_against_base_dir(
    keydir: Path, tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(ConfigError, match="cannot read"):
        JwtAuthenticator([issuer(RS, ("RS256",), public_key_file="rs.pem")], {}, base_dir=elsewhere)
    absolute = issuer(RS, ("RS256",), public_key_file=str(keydir / "rs.pem"))
    auth = JwtAuthenticator([absolute], {}, base_dir=elsewhere)
    assert auth.authenticate(sign(claims(RS), rsa_key, "RS256")).name == "alice"
