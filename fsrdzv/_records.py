"""What a node reads of the other nodes' records, through its :class:`~fsrdzv._session.Session`: their join
requests (:class:`RequestBook`, with this node's own) and their heartbeats (:class:`BeatFilter` for the sweeps'
listings, :class:`SignedBeats` for which signed heartbeats count)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Final

from ._errors import RendezvousStateError
from ._session import Session
from ._state import INLINE_PREFIX, JoinRequest, decode_request, decode_request_name, encode_request, request_record_name

__all__ = ["PREDICTED_BEATS", "BeatFilter", "RequestBook", "SignedBeats", "beat_count"]

log = logging.getLogger("fsrdzv")


class RequestBook:
    """This node's join request record, and every node's requests as one listing shows them.

    Inline names carry the request itself (decoded once); a body record (a request too long for a name) is read
    once per change of its tag. A record that does not decode, or is not signed with the job's secret, is
    reported once and ignored: never act on a record we cannot trust.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        #: Request records judged so far: name -> (tag, request or None if invalid).
        self._cache: dict[str, tuple[str, JoinRequest | None]] = {}
        #: The name of this node's current request record.
        self.own_name: str | None = None

    def put(self, request: JoinRequest) -> None:
        session = self._session
        name = request_record_name(request, session.store.name_mac)
        session.put("req", name, encode_request(request))
        previous, self.own_name = self.own_name, name
        if previous is not None and previous != name:
            session.discard("req", previous)

    def pending_looking(self) -> list[JoinRequest]:
        """Every valid request record, from one listing (the protocol decides which are pending)."""
        tags = self._session.list("req")
        out = []
        for name, tag in tags.items():
            inline = name.startswith(INLINE_PREFIX)
            cached = self._cache.get(name)
            if cached is None or (not inline and cached[0] != tag):
                cached = (tag, self._judge(name, inline))
                self._cache[name] = cached
            if cached[1] is not None:
                out.append(cached[1])
        for stale in set(self._cache) - set(tags):
            del self._cache[stale]
        return out

    def _judge(self, name: str, inline: bool) -> JoinRequest | None:
        session = self._session
        try:
            if inline:
                return decode_request_name(name, session.store.name_mac)
            raw = session.get("req", name)
            return None if raw is None else decode_request(raw, f"join request {name!r}")
        except RendezvousStateError as exc:
            log.warning("ignoring %s", exc)
            return None


def beat_count(payload: bytes) -> int | None:
    """The count of a heartbeat record's payload (``{"n": count, ...}``; see ``_keepalive``), None if it has none."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    count = body.get("n") if isinstance(body, dict) else None
    return count if type(count) is int else None


#: Beats after the newest trusted one that an observer predicts the digest of (a peer beats about once per look).
PREDICTED_BEATS: Final = 4


class SignedBeats:
    """Which heartbeats count with a job secret: a record whose signature verifies (unsealing checks it) and whose
    count is higher than any this observer trusted for it. A forged record never counts, nor an old signed one
    written again (a replay): neither can keep a dead node alive.

    Where a record's tag is the MD5 of its stored bytes (``StoreCapabilities.content_tags``), a newer beat is
    also recognised from the tag alone: the observer knows the rest of the record (a peer's heartbeat changes only
    in its count) and the secret, so it predicts the digests of the next few beats. Nobody without the secret can
    make an object with one of those digests."""

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}
        #: What follows the count in each record's payload (its address candidates, host and boot id).
        self._rest: dict[str, bytes] = {}

    def advanced(self, name: str, payload: bytes) -> bool:
        """Whether ``payload`` (verified) is a newer beat of record ``name`` than any trusted before."""
        count = beat_count(payload)
        if count is None or count <= self._highest.get(name, -1):
            return False
        self._highest[name] = count
        head = b'{"n":%d' % count
        if payload.startswith(head):
            self._rest[name] = payload[len(head) :]
        return True

    def predicted(self, name: str, tag: str, digest: Callable[[bytes], str | None]) -> bool:
        """Whether ``tag`` is the digest (``Store.record_digest``) of one of the next beats of record ``name``."""
        rest, highest = self._rest.get(name), self._highest.get(name)
        if rest is None or highest is None:
            return False
        for count in range(highest + 1, highest + 1 + PREDICTED_BEATS):
            if digest(b'{"n":%d' % count + rest) == tag:
                self._highest[name] = count
                return True
        return False

    def tag(self, session: Session, node_id: str, trusted: dict[str, str]) -> str | None:
        """The ring watch's tag of ``node_id``'s heartbeat (None: it has none): on a store of content tags, the tag
        of a newer beat this observer predicted; else the record is read and verified. A record that is no newer
        beat keeps the tag in ``trusted`` (the last one that was)."""
        store = session.store
        if store.capabilities.content_tags:
            tag = session.tag("hb", node_id)  # no body
            if tag is None:
                return None
            if self.predicted(node_id, tag, store.record_digest):
                return tag
        payload = session.get("hb", node_id)  # unsealing checks the signature
        if payload is None:
            return None
        if not self.advanced(node_id, payload):
            return trusted.get(node_id, "untrusted")
        return hashlib.sha256(payload).hexdigest()[:16]

    def forget(self, names: set[str]) -> None:
        for name in names:
            self._highest.pop(name, None)
            self._rest.pop(name, None)


class BeatFilter:
    """Heartbeat tags from one listing; with a job secret only signed heartbeats count, and only newer ones
    (:class:`SignedBeats`). A record's body is read once per tag; one that does not count keeps the tag of the
    record's last one that did (no change), or is left out."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._verified: dict[str, tuple[str, str | None]] = {}
        self._beats = SignedBeats()

    def tags(self) -> dict[str, str]:
        session = self._session
        tags = session.list("hb")
        if not session.store.signed:
            return tags
        valid = {}
        for name, tag in tags.items():
            known = self._verified.get(name)
            if known is None or known[0] != tag:
                trusted = tag if self._counts(name) else None if known is None else known[1]
                known = (tag, trusted)
                self._verified[name] = known
            if known[1] is not None:
                valid[name] = known[1]
        stale = set(self._verified) - set(tags)
        for name in stale:
            del self._verified[name]
        self._beats.forget(stale)
        return valid

    def _counts(self, name: str) -> bool:
        try:
            payload = self._session.get("hb", name)
        except RendezvousStateError as exc:
            log.warning("ignoring heartbeat: %s", exc)
            return False
        return payload is not None and self._beats.advanced(name, payload)
