"""``fsrdzv doctor``: does this endpoint give what the rendezvous relies on? One verdict per check.

Checks, in order (each one ``pass``, ``warn``, ``fail`` or ``skip``; any ``fail`` makes the command exit 1):

``reach``    create, read and delete a scratch run (``fsrdzv-doctor-<random>``, removed at the end).
``cas``      real compare-and-set: writers on separate store handles race conditional writes behind a barrier,
             for a create-if-absent and for several updates of one token; exactly one must win each race, the
             stored document must be the winner's, and a stale token must be refused.
``lock``     (directories) a lock held by another process must exclude this one's descriptor, and be free again
             once released. The same lock the store uses, so ``lock=false`` shows up as a failure here.
``mount``    (directories) the mount options of the endpoint's file system, from ``/proc/self/mountinfo``:
             options that make locks node-local (NFS ``nolock``/``local_lock``, Lustre ``localflock``/
             ``noflock``, FUSE) or that defeat close-to-open consistency (``nocto``) fail; attribute and lookup
             caching (``actimeo``, ``noac``, ``lookupcache``) and ``soft`` mounts warn.
``clock``    offset between this host's wall clock and the storage's: a file's mtime for directories, an object's
             LastModified for object stores. fsrdzv never compares clocks for liveness, so this only warns: it
             skews the idle ages ``list`` and ``gc`` show.
``latency``  median and p90 of read, CAS and record listing on the scratch run; slow storage only warns.

Same-host tests cannot prove cross-node behaviour (two NFS clients); that is why the mount options are read too.

Tests feed :func:`run_doctor` a recorded mountinfo (``mountinfo=``) and wrap the stores it opens
(``wrap_store=``, e.g. a :class:`fsrdzv.testing.FaultyStore` that lies about CAS); the library reads no test hook.
"""

from __future__ import annotations

from ._check import CHECKS, DOCTOR_SCHEMA, Check
from ._mount import MountEntry, find_mount, mount_findings, parse_mountinfo
from ._runner import run_doctor

__all__ = [
    "CHECKS",
    "DOCTOR_SCHEMA",
    "Check",
    "MountEntry",
    "find_mount",
    "mount_findings",
    "parse_mountinfo",
    "run_doctor",
]
