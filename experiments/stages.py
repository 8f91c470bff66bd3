"""Stages of a long run that survive being killed.

A stage is one call of a script. Before it runs, the paths it writes are claimed in the run's output
folder (`agree.ownership.OutputFolder`) and a manifest records its command and a fingerprint (size and
modification time) of every file it reads; when it has finished, the manifest also records the files it
wrote. Running the same plan again:

* a finished stage whose command and inputs are unchanged and whose outputs are intact is skipped (its
  outputs keep their bytes);
* a stage whose command or inputs changed (a later stage sees the new outputs of an earlier one as changed
  inputs) is done again, after its earlier outputs are deleted;
* a stage that was killed is done again, or, if it is `resumable` (fine-tuning with `--resume latest`)
  and its command and inputs are those it started with, run again over its partial outputs, so that it
  continues from its newest checkpoint.

Each stage prints one line with its elapsed time and the run's ETA, estimated from the stages of the
same kind timed so far (in this run or recorded in the manifests of earlier runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from agree.io import InputError, read_json, write_json
from agree.ownership import OutputFolder

MANIFESTS = "manifests"  # <out>/manifests/<stage>.json
LOGS = "logs"  # <out>/logs/<stage>.log
RUNNING, DONE = "running", "done"


def fingerprint(path: Path) -> Optional[dict]:
    """{"size", "mtime_ns"} of a file, None if it does not exist."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def format_seconds(seconds: float) -> str:
    """H:MM:SS."""
    s = int(max(0, round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Stage:
    """One script call: what it reads, what it writes, how it is recorded."""

    name: str  # unique within a run; names its log and manifest
    kind: str  # for the ETA: stages of a kind take about as long as each other
    script: str  # path of the script, relative to the repository
    flags: list[str]
    inputs: list[Path]  # files it reads (fingerprinted)
    outputs: list[Path]  # files it writes; all must exist when it has finished
    folders: list[Path] = field(default_factory=list)  # folders it writes into, owned whole
    volatile: tuple[str, ...] = ()  # flag prefixes left out of the recorded command (e.g. a port)
    resumable: bool = False  # killed, it is run again over its partial outputs and continues
    discard: list[Path] = field(default_factory=list)  # files deleted once it has finished

    def command(self) -> list[str]:
        """The recorded command: the script and its flags without the volatile ones."""
        return [self.script] + [f for f in self.flags if not f.startswith(self.volatile)]


class StageRunner:
    """Runs stages under one output folder, skipping and resuming as its manifests say."""

    def __init__(self, folder: OutputFolder, repo: Path, python: str = sys.executable):
        self.folder = folder
        self.out = folder.path
        self.repo = repo
        self.python = python
        self.total = 0  # stages in the plan (for "i/n")
        self.remaining: dict[str, str] = {}  # stage -> kind, of the planned stages still to run
        self.done = 0
        self.seconds: dict[str, list[float]] = {}  # kind -> durations measured in this run
        self.recorded: dict[str, list[float]] = {}  # kind -> durations in the manifests
        self.timings: dict[str, float] = {}  # stage -> seconds it took when it last ran
        self._changing: set[str] = set()  # outputs of the planned stages that will run

    def plan(self, stage: Stage) -> None:
        """Count a stage of the plan; one that is done already adds nothing to the ETA."""
        self.total += 1
        manifest = self._manifest(stage.name)
        if manifest is not None and manifest.get("seconds"):
            self.recorded.setdefault(stage.kind, []).append(float(manifest["seconds"]))
        changing = any(str(p) in self._changing for p in stage.inputs)
        if changing or self.status(stage) != "done":
            self.remaining[stage.name] = stage.kind
            self._changing.update(str(p) for p in stage.outputs)

    # ------------------------------------------------------------------ records
    def manifest_path(self, name: str) -> Path:
        """<out>/manifests/<stage>.json."""
        return self.out / MANIFESTS / f"{name}.json"

    def log_path(self, name: str) -> Path:
        """<out>/logs/<stage>.log."""
        return self.out / LOGS / f"{name}.log"

    def _manifest(self, name: str) -> Optional[dict]:
        path = self.manifest_path(name)
        return read_json(path) if path.is_file() else None

    def _key(self, stage: Stage) -> dict:
        return {
            "command": stage.command(),
            "inputs": {str(p): fingerprint(p) for p in stage.inputs},
        }

    def _intact(self, manifest: dict) -> bool:
        return all(fingerprint(Path(p)) == fp for p, fp in manifest.get("outputs", {}).items())

    def status(self, stage: Stage) -> str:
        """ "done" (skip), "resume" (run again over its partial outputs) or "new" (delete them, run)."""
        manifest = self._manifest(stage.name)
        if manifest is None:
            return "new"
        key = self._key(stage)
        same = manifest.get("command") == key["command"] and manifest.get("inputs") == key["inputs"]
        if manifest.get("status") == DONE and same and self._intact(manifest):
            return "done"
        if manifest.get("status") == RUNNING and same and stage.resumable:
            return "resume"
        return "new"

    # ------------------------------------------------------------------ ownership
    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out.resolve()).as_posix()

    def claim(self, paths: Iterable[Path], folder: bool = False) -> None:
        """Claim paths before writing them; a path that exists and was not written by the runner is refused."""
        paths = list(paths)
        for p in paths:
            if Path(p).exists() and not self.folder.owns(self._rel(p)):
                raise InputError(
                    f"{p} exists and was not written by {self.folder.owner}; it will not replace it: "
                    "move it away or choose another --out"
                )
        self.folder.claim(*paths, folder=folder)

    def _delete_outputs(self, stage: Stage, manifest: Optional[dict]) -> None:
        """Delete what an earlier run of the stage wrote (owned paths only)."""
        paths = [*stage.outputs, *stage.folders]
        if manifest is not None:
            paths += [Path(p) for p in manifest.get("outputs", {})]
        claims = {c.rstrip("/") for c in self.folder.claims}
        owned = []
        for p in paths:
            try:
                rel = self._rel(p)
            except ValueError:
                continue  # not under --out: never the runner's to delete
            if rel in claims and Path(p).exists():
                owned.append(rel + ("/" if Path(p).is_dir() else ""))
        if owned:
            keep = [c for c in self.folder.claims if c not in owned]
            self.folder.remove_owned(keep=keep)

    # ------------------------------------------------------------------ running
    def run(self, stage: Stage) -> str:
        """Run (or skip, or resume) one stage; return its status before it ran."""
        state = self.status(stage)
        manifest = self._manifest(stage.name)
        start = time.time()
        if state == "done":
            self.timings[stage.name] = float(manifest.get("seconds", 0.0))
            self._finish(stage, "done earlier, skipped", float(manifest.get("seconds", 0.0)), False)
            return state
        if state == "new":
            self._delete_outputs(stage, manifest)
        self.claim([self.manifest_path(stage.name), self.log_path(stage.name)])
        self.claim(stage.outputs)
        self.claim(stage.folders, folder=True)
        write_json(self.manifest_path(stage.name), {**self._key(stage), "status": RUNNING})
        self._call(stage, append=state == "resume")
        missing = [str(p) for p in stage.outputs if not Path(p).is_file()]
        if missing:
            raise InputError(f"stage {stage.name!r} finished without writing {', '.join(missing)}")
        for p in stage.discard:
            if Path(p).is_file() and self.folder.owns(self._rel(p)):
                Path(p).unlink()
        seconds = round(time.time() - start, 1)
        record = {
            **self._key(stage),
            "status": DONE,
            "outputs": {str(p): fingerprint(p) for p in stage.outputs},
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json(self.manifest_path(stage.name), record)
        self.timings[stage.name] = seconds
        self._finish(stage, "resumed, finished" if state == "resume" else "finished", seconds, True)
        return state

    def _call(self, stage: Stage, append: bool) -> None:
        log = self.log_path(stage.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-u", str(self.repo / stage.script), *stage.flags]
        print(f"[{time.strftime('%H:%M:%S')}] {stage.name} ...", flush=True)
        with open(log, "a" if append else "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.repo, env=env
            ).returncode
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise InputError(
                f"stage {stage.name!r} failed (exit {rc}); last lines of {log}:\n  "
                + "\n  ".join(tail)
            )

    # ------------------------------------------------------------------ progress
    def _finish(self, stage: Stage, what: str, seconds: float, timed: bool) -> None:
        self.done += 1
        if timed and seconds > 0:
            self.seconds.setdefault(stage.kind, []).append(seconds)
        self.remaining.pop(stage.name, None)
        eta, untimed = self.eta()
        when = time.strftime(
            "%a %H:%M" if eta > 20 * 3600 else "%H:%M", time.localtime(time.time() + eta)
        )
        rest = f"run ETA {format_seconds(eta)} (about {when})" if self.remaining else "nothing left"
        if untimed:
            rest += f"; not yet timed: {', '.join(untimed)}"
        count = f"{self.done}/{self.total} " if self.total else ""
        print(
            f"[{time.strftime('%H:%M:%S')}] {count}{stage.name}: {what} "
            f"({format_seconds(seconds)}); {rest}",
            flush=True,
        )

    def eta(self) -> tuple[float, list[str]]:
        """(seconds the remaining stages should take, kinds among them not timed yet)."""
        total, untimed = 0.0, []
        for kind in self.remaining.values():
            times = self.seconds.get(kind) or self.recorded.get(kind)
            if times:
                total += sum(times) / len(times)
            elif kind not in untimed:
                untimed.append(kind)
        return total, untimed
