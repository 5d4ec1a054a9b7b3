"""Bearer JWTs from configured issuers, turned into principals.

The algorithm is pinned per issuer and never read from the token: a token's `alg` header is chosen
by whoever made the token, so trusting it lets an attacker send `alg: none`, or an HS256 token whose
HMAC secret is the issuer's *public* RSA key (key confusion). So an issuer's algorithms are all of
one family, and every one of its keys must fit every one of them, checked at start. Keys are loaded
once, at start; a JWKS is a local file, never fetched. The unverified `iss` only picks which
issuer's keys to try: every claim that counts is read after the signature is verified.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import jwt
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from llmrouter.accounts.principal import UNLIMITED, Principal
from llmrouter.errors import AuthenticationFailed
from llmrouter.settings import ConfigError, JwtAlgorithm, JwtIssuer, Policy

__all__ = ["JwtAuthenticator"]

_MAX_SUBJECT_CHARS = 256

_PublicKey = RSAPublicKey | EllipticCurvePublicKey
_Key = bytes | _PublicKey  # bytes: an HMAC secret
_NEEDS = {
    "HS": "an HMAC secret",
    "RS": "an RSA public key",
    "PS": "an RSA public key",
    "ES": "an EC public key",
}
# Claims read over the policy's limits when `limit_claims`, each checked as Policy checks it.
_LIMIT_CLAIMS = ("rpm", "tpm", "max_concurrent", "credit_limit", "reset")
_BAD_SIGNATURE = "JWT signature or algorithm is not accepted."
_FAILURES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (jwt.ExpiredSignatureError, "JWT expired."),
    (jwt.ImmatureSignatureError, "JWT is not valid yet."),
    (jwt.InvalidAudienceError, "JWT audience is not accepted."),
    (jwt.InvalidIssuerError, "JWT issuer is not accepted."),
    # before DecodeError, InvalidSignatureError's base class
    ((jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError), _BAD_SIGNATURE),
    (jwt.DecodeError, "JWT is malformed."),
)


@dataclass(frozen=True, slots=True)
class _Issuer:
    config: JwtIssuer
    keys: dict[str | None, _Key]  # by `kid`; None: the one secret or PEM key
    algorithms: list[str]
    policy: Policy  # when the token names none


class JwtAuthenticator:
    """Verifies bearer JWTs of the configured issuers; config errors are raised here, at start."""

    def __init__(
        self,
        issuers: Sequence[JwtIssuer],
        policies: Mapping[str, Policy],
        *,
        base_dir: Path | None = None,
    ) -> None:
        self._policies = dict(policies)
        self._issuers: dict[str, _Issuer] = {}
        for i, config in enumerate(issuers):
            where = f"accounts.jwt[{i}] (issuer {config.issuer!r})"
            if config.issuer in self._issuers:
                raise ConfigError(f"{where}: this issuer is configured twice")
            if config.default_policy is not None and config.default_policy not in policies:
                raise ConfigError(f"{where}: default_policy {config.default_policy!r} is not a policy")
            policy = policies[config.default_policy] if config.default_policy is not None else UNLIMITED
            keys = _load_keys(config, base_dir, where)
            self._issuers[config.issuer] = _Issuer(config, keys, sorted(config.algorithms), policy)

    def authenticate(self, token: str) -> Principal:
        """The principal a bearer JWT stands for, or AuthenticationFailed (401)."""
        try:
            return self._authenticate(token)
        except AuthenticationFailed:
            raise
        except jwt.MissingRequiredClaimError as exc:
            raise _failure(f"JWT lacks the required claim {exc.claim!r}.") from None
        except Exception as exc:  # whatever a token's bytes provoke is the caller's fault: a 401
            message = next((m for kind, m in _FAILURES if isinstance(exc, kind)), "JWT is not valid.")
            raise _failure(message) from None

    def _authenticate(self, token: str) -> Principal:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _failure("JWT issuer is not accepted.")
        config = issuer.config
        kid = jwt.get_unverified_header(token).get("kid") if config.jwks_file is not None else None
        key = issuer.keys.get(kid)
        if key is None:
            raise _failure("JWT key id (kid) is not one of the issuer's keys.")
        claims = jwt.decode(
            token,
            key,
            algorithms=issuer.algorithms,  # the configured ones, whatever the token's header says
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway_seconds,
            options={"require": ["exp", "iss", config.subject_claim]},
        )
        subject = claims[config.subject_claim]
        if not isinstance(subject, str) or not subject or "\x00" in subject:
            raise _failure(f"JWT claim {config.subject_claim!r} must be a non-empty string without NUL.")
        if len(subject) > _MAX_SUBJECT_CHARS:  # it names the principal in the ledger and the log
            raise _failure(
                f"JWT claim {config.subject_claim!r} is longer than {_MAX_SUBJECT_CHARS} characters."
            )
        return Principal(
            id=f"jwt:{config.issuer} {subject}",
            kind="jwt",
            name=subject,
            limits=self._limits(issuer, claims),
            expires_at=int(claims["exp"]),
        )

    def _limits(self, issuer: _Issuer, claims: dict[str, Any]) -> Policy:
        config = issuer.config
        name = claims.get(config.policy_claim)
        if name is None:
            policy = issuer.policy
        elif not isinstance(name, str):
            raise _failure(f"JWT claim {config.policy_claim!r} must be a string.")
        elif name not in self._policies:
            raise _failure(f"JWT claim {config.policy_claim!r} names an unknown policy.")
        else:
            policy = self._policies[name]
        changes: dict[str, Any] = {}
        wanted = {field: claims.get(field) for field in _LIMIT_CLAIMS} if config.limit_claims else {}
        wanted["models"] = claims.get(config.models_claim)
        for field, value in wanted.items():
            if value is None:
                continue
            try:  # one field at a time, so that the error can name the claim
                changes[field] = getattr(msgspec.convert({field: value}, Policy), field)
            except msgspec.ValidationError:
                claim = config.models_claim if field == "models" else field
                raise _failure(f"JWT claim {claim!r} has the wrong type or value.") from None
        return msgspec.structs.replace(policy, **changes)


def _failure(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_token")


def _load_keys(config: JwtIssuer, base_dir: Path | None, where: str) -> dict[str | None, _Key]:
    """The issuer's keys by `kid`, each checked against every pinned algorithm."""
    sources = [s for s in (config.secret, config.public_key_file, config.jwks_file) if s is not None]
    if len(sources) != 1:
        raise ConfigError(f"{where}: set exactly one of secret, public_key_file or jwks_file")
    pinned: list[str] = sorted(config.algorithms)
    unknown = [a for a in pinned if a not in get_args(JwtAlgorithm)]
    if unknown:
        raise ConfigError(f"{where}: unsupported algorithm {unknown[0]!r}")
    if len({_NEEDS[a[:2]] for a in pinned}) > 1:
        raise ConfigError(f"{where}: algorithms {', '.join(pinned)} mix HS*, RS*/PS* and ES*")
    if config.secret is not None:
        keys: dict[str | None, _Key] = {None: config.secret.encode()}
    else:
        path = (base_dir or Path()) / sources[0]  # an absolute name stays as it is
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        try:
            keys = {None: _pem_key(data)} if config.public_key_file is not None else _jwks_keys(data)
        except ValueError as exc:
            raise ConfigError(f"{where}: {path}: {exc}") from None
    for kid, key in keys.items():
        label = "the key" if kid is None else f"JWKS key {kid!r}"
        kind = _kind(key)
        for name in pinned:
            if _NEEDS[name[:2]] != kind:
                raise ConfigError(f"{where}: {name} needs {_NEEDS[name[:2]]}, but {label} is {kind}")
            algorithm = jwt.get_algorithm_by_name(name)
            try:  # PyJWT's own checks: the EC curve, a PEM or JWK pasted as secret, key length
                weakness = algorithm.check_key_length(algorithm.prepare_key(key))
            except jwt.InvalidKeyError as exc:
                raise ConfigError(f"{where}: {label} does not fit {name}: {exc}") from None
            if weakness:
                raise ConfigError(f"{where}: {label} is too weak for {name}: {weakness}")
    return keys


def _kind(key: _Key) -> str:
    if isinstance(key, bytes):
        return _NEEDS["HS"]
    return _NEEDS["RS"] if isinstance(key, RSAPublicKey) else _NEEDS["ES"]


def _pem_key(data: bytes) -> _PublicKey:
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, _PublicKey):
        raise ValueError("not an RSA or EC public key")
    return key


def _jwks_keys(data: bytes) -> dict[str | None, _Key]:
    try:
        entries = json.loads(data)["keys"]
    except (ValueError, TypeError, KeyError):
        entries = None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    keys: dict[str | None, _Key] = {}
    for i, entry in enumerate(entries):
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key, never used to verify
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            raise ValueError(f"key {i} has no kid, or one used before")
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, _PublicKey):
            raise ValueError(f"key {kid!r} is not an RSA or EC public key")
        keys[kid] = key
    if not keys:
        raise ValueError("no signing keys")
    return keys
