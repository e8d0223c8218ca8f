"""What a node reads of the other nodes' records, through its :class:`~fsrdzv._session.Session`: their join
requests (:class:`RequestBook`, with this node's own) and their heartbeats (:class:`BeatFilter` for the sweeps'
listings, :class:`SignedBeats` for which signed heartbeats count)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Final

from ._errors import RendezvousStateError
from ._session import Session
from ._state import INLINE_PREFIX, JoinRequest, decode_request, decode_request_name, encode_request, request_record_name
from ._store import record_hash

__all__ = ["PREDICTED_BEATS", "UNTRUSTED", "BeatFilter", "RequestBook", "SignedBeats", "beat_count"]

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


#: The ring watch's tag of a heartbeat record that exists but never counted (a forged or unreadable one).
UNTRUSTED: Final = "untrusted"

#: Beats after the newest trusted one that an observer predicts the digest of (a peer beats about once per look).
PREDICTED_BEATS: Final = 4


class SignedBeats:
    """Which heartbeats count with a job secret: a record whose signature verifies (unsealing checks it) and whose
    count is higher than any this observer trusted for it. A forged record never counts, nor an old signed one
    written again (a replay): neither can keep a dead node alive. Each record keeps the tag of its last beat that
    counted, so a record that does not count is no change.

    Where a record's tag is the MD5 of its stored bytes (``StoreCapabilities.content_tags``), a newer beat is
    also recognised from the tag alone: the observer knows the rest of the record (a peer's heartbeat changes only
    in its count) and the secret, so it predicts the digests of the next few beats. Nobody without the secret can
    make an object with one of those digests."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._highest: dict[str, int] = {}
        #: What follows the count in each record's payload (its address candidates, host and boot id).
        self._rest: dict[str, bytes] = {}
        #: The tag of each record's last beat that counted, and the last tag judged (counted or not).
        self._trusted: dict[str, str] = {}
        self._judged: dict[str, str] = {}

    def watched(self, name: str) -> str | None:
        """The ring watch's tag of heartbeat record ``name`` (None: there is none), one request: on a store of
        content tags the record's tag (no body unless no prediction matches), else its body."""
        session = self._session
        if session.store.capabilities.content_tags:
            tag = session.tag("hb", name)
            payload = None
        else:
            try:
                payload = session.get("hb", name)  # unsealing checks the signature
            except RendezvousStateError as exc:
                log.debug("heartbeat of %s not trusted: %s", name, exc)
                return self._trusted.get(name, UNTRUSTED)
            tag = None if payload is None else record_hash(payload)
        if tag is None:
            self.forget({name})
            return None
        return self.judged(name, tag, payload) or UNTRUSTED

    def judged(self, name: str, tag: str, payload: bytes | None = None) -> str | None:
        """The tag that counts for record ``name`` now that its tag is ``tag``: ``tag`` itself if it is a newer beat
        (predicted from a content tag, else ``payload`` or the record read and verified), else the tag of its last
        beat that counted (None: none yet). A tag is judged once."""
        trusted = self._trusted.get(name)
        if tag == self._judged.get(name):
            return trusted  # judged already: a record's body is read at most once per tag
        store = self._session.store
        newer = store.capabilities.content_tags and self._predicted(name, tag, store.record_digest)
        if not newer:
            if payload is None:
                payload = self._read(name)  # a storage error leaves the tag to be judged at the next look
            newer = payload is not None and self._advanced(name, payload)
        self._judged[name] = tag
        if not newer:
            return trusted
        self._trusted[name] = tag
        return tag

    def forget(self, names: set[str]) -> None:
        for name in names:
            self._highest.pop(name, None)
            self._rest.pop(name, None)
            self._trusted.pop(name, None)
            self._judged.pop(name, None)

    def names(self) -> set[str]:
        return set(self._judged)

    def _read(self, name: str) -> bytes | None:
        try:
            return self._session.get("hb", name)  # unsealing checks the signature
        except RendezvousStateError as exc:
            log.warning("ignoring heartbeat: %s", exc)  # once per tag (see judged)
            return None

    def _advanced(self, name: str, payload: bytes) -> bool:
        """Whether ``payload`` (verified) is a newer beat of record ``name`` than any trusted before."""
        count = beat_count(payload)
        if count is None or count <= self._highest.get(name, -1):
            return False
        self._highest[name] = count
        head = b'{"n":%d' % count
        if payload.startswith(head):
            self._rest[name] = payload[len(head) :]
        return True

    def _predicted(self, name: str, tag: str, digest: Callable[[bytes], str | None]) -> bool:
        """Whether ``tag`` is the digest (``Store.record_digest``) of one of the next beats of record ``name``."""
        rest, highest = self._rest.get(name), self._highest.get(name)
        if rest is None or highest is None:
            return False
        for count in range(highest + 1, highest + 1 + PREDICTED_BEATS):
            if digest(b'{"n":%d' % count + rest) == tag:
                self._highest[name] = count
                return True
        return False


class BeatFilter:
    """Heartbeat tags from one listing; with a job secret only signed heartbeats count, and only newer ones
    (:class:`SignedBeats`): a record that does not count keeps the tag of its last one that did (no change), or is
    left out. A record's body is read at most once per tag, and not at all for a beat predicted from its tag."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._beats = SignedBeats(session)

    def tags(self) -> dict[str, str]:
        session = self._session
        tags = session.list("hb")
        if not session.store.signed:
            return tags
        valid = {}
        for name, tag in tags.items():
            trusted = self._beats.judged(name, tag)
            if trusted is not None:
                valid[name] = trusted
        self._beats.forget(self._beats.names() - set(tags))
        return valid
