"""Opening a run directory for a sweep: its one owner, atomic creation, checks before planning.

:func:`open_run` is what :func:`llm_dvfs.sweep.execute.execute` enters before it plans the cells
it will run, and holds for the whole run:

* a new run: leftovers of killed starts are removed, the directory is created atomically with
  its manifest and lock (:meth:`~llm_dvfs.sweep.rundir.RunDir.create_new`);
* ``--resume``: the lock is taken (:func:`llm_dvfs.sweep.lock.hold`; a second owner is refused,
  an earlier owner that was killed is reported and recorded under ``lock_takeovers``), the
  manifest read (recovered from its backup when damaged), every finished cell verified against
  its marker's digests (damaged cells are quarantined, recorded under ``repairs`` and run again),
  and the parts of the cell that was in progress removed.

Failure modes: :class:`~llm_dvfs.sweep.lock.RunDirInUse` and
:class:`~llm_dvfs.errors.ConfigError` (exit status 2 in the CLI), before anything is changed.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import llm_dvfs.sweep.lock as run_lock  # not `from llm_dvfs.sweep import`: the package imports this
from llm_dvfs.sweep.plan import Plan, new_manifest
from llm_dvfs.sweep.rundir import RunDir, git_revision, now_iso

log = logging.getLogger("llm_dvfs.sweep.session")


def _note_takeover(manifest: dict[str, Any], lk: run_lock.RunLock, path: Path) -> None:
    prev = lk.previous
    if not prev:
        return
    what = run_lock.describe_owner(prev)
    log.warning("%s: the previous owner, %s, ended without releasing the run directory (killed?); "
                "this process took over its lock", path, what)
    manifest.setdefault("lock_takeovers", []).append({"at": now_iso(), "previous_owner": prev})


@contextlib.contextmanager
def open_run(plan: Plan, argv: Optional[Sequence[str]] = None) -> Iterator[tuple[RunDir, dict[str, Any]]]:
    """Own ``plan.out`` for the block; yields the run directory and its manifest (not yet
    rewritten: the caller writes it). See the module docstring."""
    command = list(argv) if argv is not None else list(sys.argv)
    rd = RunDir(plan.out)
    if not plan.resume:
        rd.clean_leftovers()
        manifest = new_manifest(plan, argv)
        lk = rd.create_new(manifest, command)
        run_lock.adopt(lk, rd.path)
        try:
            yield rd, manifest
        finally:
            run_lock.forget(rd.path)
        return
    with run_lock.hold(rd.path, command) as lk:
        manifest = rd.read_manifest()
        _note_takeover(manifest, lk, rd.path)
        manifest["resumes"] = list(manifest.get("resumes", [])) + [
            {"at": now_iso(), "command": command, "git_revision": git_revision()}]
        manifest["status"] = "running"
        manifest["finished_at"] = None
        manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + plan.notes))
        rd.create()
        damaged = rd.verify(plan.cells)
        if damaged:
            manifest.setdefault("repairs", []).extend(
                dict(d.as_dict(), at=now_iso(), action="quarantined to damaged/, cell run again") for d in damaged)
        removed = rd.remove_partial(plan.cells)
        if removed:
            log.info("removed %d part file(s) of the cell that was interrupted", removed)
        yield rd, manifest


__all__ = ["open_run"]
