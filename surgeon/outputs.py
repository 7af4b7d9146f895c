"""Output safety: every file and folder a command writes goes through this module.

The promises (README, "Errors and output promises"):

* **Nothing foreign is destroyed.** A target that exists is replaced only with ``force`` and
  only when it is a previous surgeon output of the same kind, recognised by its content
  (:func:`recognise`: the ``kind`` of a JSON artifact, ``rewrite.json`` of a rewrite folder,
  ``manifest.json`` of an export, ``state.json``/``summary.json`` of a build, the title of a
  report, the header of a tuned recipe). The current directory, its parents, the home folder,
  an input or a folder holding an input are never targets. Anything else is :class:`BadInput`
  (exit 2), raised before any work.
* **Atomic.** The new output is written completely under a temporary name beside OUT,
  ``.<name>.surgeon-tmp-<pid>-<random>``, and then switched in: one ``renameat2`` call that
  exchanges it with the old output (``RENAME_EXCHANGE``) or moves it to a free name
  (``RENAME_NOREPLACE``), so at every moment OUT is either the old or the new output. Where the
  kernel lacks ``renameat2`` the old output is first renamed to ``.<name>.surgeon-trash-<pid>-…``
  and put back by the next run if the switch was interrupted. Temporaries and trash of killed
  runs (their pid no longer alive) are removed by the next run into the same OUT.
* **One writer.** ``.<name>.surgeon-lock`` beside OUT (``O_CREAT|O_EXCL``, the pid inside) is
  held from the first check to the switch; a second writer exits 2 at once; a lock whose pid is
  dead is taken over.
* **Umask.** Files are created with mode 0666 and folders 0777 minus the umask.

Test hooks (read only in the switch step): ``SURGEON_TEST_PAUSE_BEFORE_SWITCH=FILE`` /
``SURGEON_TEST_PAUSE_AFTER_SWITCH=FILE`` make the writer create FILE (its pid inside) just before
/ just after the switch and wait until FILE is removed (at most 120 s), so a test can SIGKILL it
at a known point, or start a second writer while the first holds the lock.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional, Union

from surgeon.errors import BadInput

TMP_TAG = ".surgeon-tmp-"
TRASH_TAG = ".surgeon-trash-"
LOCK_TAG = ".surgeon-lock"
PAUSE_BEFORE = "SURGEON_TEST_PAUSE_BEFORE_SWITCH"
PAUSE_AFTER = "SURGEON_TEST_PAUSE_AFTER_SWITCH"

KINDS = {
    # kind: (folder?, description)
    "rewrite": (True, "rewrite folder (rewrite.json)"),
    "export": (True, "export folder (manifest.json)"),
    "build": (True, "build folder (state.json / summary.json)"),
    "report": (False, "profile report (report.html)"),
    "tune-recipe": (False, "recipe written by `surgeon tune`"),
}

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- recognition

def _json_kind(p: Path) -> Optional[str]:
    try:
        with open(p, "rb") as f:
            raw = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return None
    k = raw.get("kind") if isinstance(raw, dict) else None
    return k if isinstance(k, str) else None


def _head(p: Path, n: int = 4096) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


REPORT_MARK = b"<title>surgeon profile report</title>"
TUNE_MARK = b"# surgeon tune "


def kind_of_bytes(data: bytes) -> Optional[str]:
    """The kind of output ``data`` is (what :func:`recognise` would say of a file holding it)."""
    if data.startswith(TUNE_MARK):
        return "tune-recipe"
    if REPORT_MARK in data[:4096]:
        return "report"
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    k = raw.get("kind") if isinstance(raw, dict) else None
    return k if isinstance(k, str) else None


def recognise(path: PathLike) -> Optional[str]:
    """The kind of surgeon output at ``path``, or None when surgeon did not write it."""
    p = Path(path)
    if p.is_symlink():
        return None
    if p.is_dir():
        if _json_kind(p / "rewrite.json") == "rewrite":
            return "rewrite"
        if _json_kind(p / "manifest.json") == "export-manifest":
            return "export"
        if _json_kind(p / "summary.json") == "build-summary" or (p / "state.json").is_file() and \
                isinstance(_load_json(p / "state.json"), dict):
            return "build"
        return None
    if p.is_file():
        head = _head(p)
        if head.startswith(TUNE_MARK):
            return "tune-recipe"
        if REPORT_MARK in head:
            return "report"
        return _json_kind(p)
    return None


def _load_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- checks

def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _describe(kind: str) -> str:
    return KINDS.get(kind, (False, f"'{kind}' artifact"))[1]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abs(path: PathLike) -> Path:
    p = Path(os.path.abspath(os.fspath(path)))
    return p.parent.resolve() / p.name if p.name else p.resolve()


def check_target(path: PathLike, kind: str, *, force: bool = False, inputs: Iterable[Optional[PathLike]] = (),
                 option: str = "--out", own: bool = False) -> Path:
    """Refuse, before any work, a target surgeon may not write; returns its absolute path.

    ``own``: the caller owns the folder the target is in (a file inside its own build folder or
    temporary folder), so an existing target of any kind may be replaced with ``force``."""
    raw = os.fspath(path)
    if not raw or "\x00" in raw:
        raise BadInput(f"{option} {raw!r} is not a usable path", "give a file or folder name")
    try:
        p = _abs(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{option} {raw!r} is not a usable path ({e})", "give a file or folder name") from None
    if not p.name or len(p.name.encode()) > 255:
        raise BadInput(f"{option} {raw} is not a usable output name", "give a file or folder name")
    cwd = Path.cwd().resolve()
    if p == cwd or p in cwd.parents or p == Path.home().resolve() or p == Path(p.anchor):
        raise BadInput(f"{option} {raw} is the current directory or one of its parents",
                       "give a new folder name, e.g. --out out/rewritten")
    for i in inputs:
        if i is None or isinstance(i, dict):
            continue
        try:
            ip = _abs(i)
        except (OSError, ValueError):
            continue
        if ip == p or p in ip.parents:
            raise BadInput(f"{option} {raw} is an input of this command (or holds one: {i})",
                           "choose an output path that is not an input")
    anc = p.parent
    while not anc.exists():
        if anc.is_symlink():
            raise BadInput(f"{option} {raw}: {anc} is a dangling symbolic link", "choose another output path")
        anc = anc.parent
    if not anc.is_dir():
        raise BadInput(f"{option} {raw}: {anc} is not a folder", "choose an output path inside a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {raw}: cannot write in {anc} (permission denied)",
                       "choose a writable output folder")
    if p.is_symlink() or p.exists():
        if not force:
            raise BadInput(f"{p} already exists", "pass --force to overwrite it")
        got = recognise(p)
        if got != kind and not (own and p.is_file() and not p.is_symlink()):
            what = "a folder" if p.is_dir() else "a file"
            seen = f" (it holds a surgeon '{got}' output)" if got else ""
            raise BadInput(f"{p} is {what} surgeon did not write as a {_describe(kind)}{seen}",
                           "--force replaces only a previous output of the same kind; choose another path")
    return p


# --------------------------------------------------------------------------- the lock

_HELD: dict[Path, int] = {}  # lock file -> re-entry count (this process)


def _lock_path(p: Path) -> Path:
    return p.parent / f".{p.name}{LOCK_TAG}"


def _acquire(p: Path) -> Path:
    lk = _lock_path(p)
    if lk in _HELD:
        _HELD[lk] += 1
        return lk
    for _ in range(3):
        try:
            fd = os.open(lk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                pid = int(lk.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid) and pid != os.getpid():
                raise BadInput(f"{p} is being written by another surgeon process (pid {pid})",
                               "wait for it to finish, or choose another output path") from None
            if not pid:  # being created right now, or garbage: give a writer a moment
                time.sleep(0.05)
                try:
                    pid = int(lk.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid) and pid != os.getpid():
                    raise BadInput(f"{p} is being written by another surgeon process (pid {pid})",
                                   "wait for it to finish, or choose another output path") from None
            stale = lk.with_name(f"{lk.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
            try:  # take the stale lock over: move it away (atomic), then retry the exclusive create
                os.rename(lk, stale)
                os.unlink(stale)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise BadInput(f"cannot write in {p.parent} ({e.strerror})", "choose a writable output folder") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        _HELD[lk] = 1
        return lk
    raise BadInput(f"could not take the lock {lk}", "remove it if no surgeon process is running")


def _release(lk: Path) -> None:
    n = _HELD.get(lk, 0)
    if n > 1:
        _HELD[lk] = n - 1
        return
    _HELD.pop(lk, None)
    try:
        os.unlink(lk)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- temporaries

def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _tag_pid(name: str, tag: str) -> int:
    rest = name.split(tag, 1)[1]
    try:
        return int(rest.split("-", 1)[0])
    except ValueError:
        return 0


def clean_stale(path: PathLike) -> list[Path]:
    """Remove temporaries and trash of dead runs beside ``path`` (an interrupted fallback switch
    is undone first: its trash is the old output and goes back to ``path``). Returns what went."""
    p = _abs(path)
    if not p.parent.is_dir():
        return []
    gone: list[Path] = []
    tmp_pre, trash_pre = f".{p.name}{TMP_TAG}", f".{p.name}{TRASH_TAG}"
    for q in sorted(p.parent.iterdir()):
        for pre, tag in ((tmp_pre, TMP_TAG), (trash_pre, TRASH_TAG)):
            if q.name.startswith(pre) and not _pid_alive(_tag_pid(q.name, tag)):
                if tag == TRASH_TAG and not (p.exists() or p.is_symlink()):
                    os.rename(q, p)  # the switch was cut between its two renames: restore the old output
                else:
                    _remove(q)
                gone.append(q)
    return gone


_LIBC = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the C library or the file system lacks it."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.renameat2  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC is False:
        return False
    r = _LIBC.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags)
    if r == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _pause(var: str) -> None:
    """Test hook: create FILE (pid inside) and wait while it exists (at most 120 s)."""
    f = os.environ.get(var)
    if f:
        Path(f).write_text(f"{os.getpid()}\n")
        t_end = time.monotonic() + 120
        while os.path.exists(f) and time.monotonic() < t_end:
            time.sleep(0.05)


class Output:
    """One output (file or folder) written atomically; a context manager.

        with Output(out, "rewrite", force=force, folder=True, inputs=[profile]) as o:
            tmp = o.temp()           # build everything under tmp
            o.commit()               # switch it in

    Entering checks the target (:func:`check_target`), takes the lock, removes stale temporaries
    and creates missing parent folders; leaving without :meth:`commit` removes the temporary
    (and the parent folders it created). Re-entrant in one process (the lock is counted).
    """

    def __init__(self, path: PathLike, kind: str, *, force: bool = False, folder: Optional[bool] = None,
                 inputs: Iterable[Optional[PathLike]] = (), option: str = "--out", own: bool = False) -> None:
        self.own = own
        try:
            self.path = _abs(path)
        except (OSError, ValueError):  # e.g. an embedded NUL: check() reports it
            self.path = Path(os.fspath(path).replace("\x00", "?"))
        self.raw = path
        self.kind = kind
        self.force = force
        self.folder = KINDS.get(kind, (False,))[0] if folder is None else folder
        self.inputs = list(inputs)
        self.option = option
        self._lock: Optional[Path] = None
        self._tmp: Optional[Path] = None
        self._made: list[Path] = []
        self.existed = False
        self.committed = False

    def check(self) -> "Output":
        self.path = check_target(self.raw, self.kind, force=self.force, inputs=self.inputs, option=self.option,
                                 own=self.own)
        return self

    def __enter__(self) -> "Output":
        self.check()
        missing = []
        d = self.path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o777)
            except FileExistsError:
                continue
            except OSError as e:
                raise BadInput(f"cannot create {d} ({e.strerror})", "choose a writable output folder") from None
            self._made.append(d)
        try:
            self._lock = _acquire(self.path)
            if _HELD.get(self._lock) == 1:
                clean_stale(self.path)
            self.existed = self.path.exists() or self.path.is_symlink()
        except BaseException:
            self._undo_dirs()
            raise
        return self

    def temp(self) -> Path:
        """The temporary path beside OUT (a created empty folder for folder outputs; a file path not
        yet created for files)."""
        if self._tmp is None:
            self._tmp = self.path.parent / f".{self.path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            if self.folder:
                os.mkdir(self._tmp, 0o777)
        return self._tmp

    def write(self, data: bytes) -> Path:
        """Write ``data`` to the temporary file (mode 0666 minus umask, fsynced)."""
        t = self.temp()
        fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return t

    def commit(self) -> Path:
        """Switch the temporary in (see the module doc). The target is checked again first: what
        appeared at OUT during the run is not replaced unless it is ours to replace."""
        if self._tmp is None or not (self._tmp.exists()):
            raise RuntimeError(f"nothing was written for {self.path}")
        exists = self.path.exists() or self.path.is_symlink()
        if exists and not self.existed and not self.force:
            raise BadInput(f"{self.path} appeared while surgeon was writing it", "nothing was replaced; run again")
        if exists and (not self.force or (recognise(self.path) != self.kind and not self.own)):
            raise BadInput(f"{self.path} changed while surgeon was writing it and is no longer a "
                           f"{_describe(self.kind)}", "nothing was replaced; choose another path")
        _pause(PAUSE_BEFORE)
        tmp = self._tmp
        if exists:
            if _renameat2(tmp, self.path, RENAME_EXCHANGE):
                _pause(PAUSE_AFTER)
                _remove(tmp)  # now the old output, under the temporary name
            else:
                trash = self.path.parent / f".{self.path.name}{TRASH_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.path, trash)
                os.rename(tmp, self.path)
                _pause(PAUSE_AFTER)
                _remove(trash)
        else:
            if not _renameat2(tmp, self.path, RENAME_NOREPLACE):
                if self.path.exists():
                    raise BadInput(f"{self.path} appeared while surgeon was writing it", "nothing was replaced")
                os.rename(tmp, self.path)
            _pause(PAUSE_AFTER)
        self._tmp = None
        self._made = []
        self.committed = True
        return self.path

    def _undo_dirs(self) -> None:
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except OSError:
                break
        self._made = []

    def __exit__(self, *exc) -> None:
        try:
            if self._tmp is not None:
                _remove(self._tmp)
                self._tmp = None
        finally:
            if self._lock is not None:
                _release(self._lock)
                self._lock = None
            if not self.committed:
                self._undo_dirs()


def write_file(path: PathLike, data: bytes, kind: Optional[str] = None, *, force: bool = False,
               inputs: Iterable[Optional[PathLike]] = (), own: bool = False) -> Path:
    """Write one file atomically through :class:`Output` (``kind``: default the kind of ``data``)."""
    k = kind or kind_of_bytes(data) or "file"
    with Output(path, k, force=force, folder=False, inputs=inputs, own=own) as o:
        o.write(data)
        return o.commit()


def default_mode(root: Path) -> None:
    """Give ``root`` and everything under it the umask's usual modes (0666/0777 minus umask)."""
    um = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~um)


def holds(kind: str, *, param: str = "out", default: Optional[str] = None, inputs: tuple[str, ...] = (),
          force_param: str = "force"):
    """Decorator: check the function's output target and hold its lock for the whole call (the
    writer inside re-enters :class:`Output` for the same path and switches the result in)."""
    import functools
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            b = sig.bind(*a, **kw)
            b.apply_defaults()
            target = b.arguments.get(param) or default
            if target is None:
                return fn(*a, **kw)
            ins = [v for v in (b.arguments.get(n) for n in inputs)
                   if isinstance(v, (str, os.PathLike)) and os.fspath(v) and Path(v).exists()]
            with Output(target, kind, force=bool(b.arguments.get(force_param)), inputs=ins):
                return fn(*a, **kw)

        return wrapper

    return deco


class BuildFolder:
    """``surgeon build``'s OUT: a folder of cached stages (each written through :class:`Output`).

    OUT may be missing, an empty folder, or a previous build folder (anything else is BadInput);
    its lock is held for the whole build. A build that fails (other than a failed check, whose
    summary is kept) in an OUT it created removes OUT again: no empty or half-built folder."""

    def __init__(self, path: PathLike) -> None:
        self.raw = path
        self.path = _abs(path)
        self._lock: Optional[Path] = None
        self.created = False
        self._made: list[Path] = []

    def __enter__(self) -> "BuildFolder":
        p = self.path
        if not (p.is_dir() and not p.is_symlink() and not any(p.iterdir())):
            self.path = p = check_target(self.raw, "build", force=True)
        d = p.parent
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            os.mkdir(d, 0o777)
            self._made.append(d)
        self._lock = _acquire(p)
        clean_stale(p)
        if not p.exists():
            os.mkdir(p, 0o777)
            self.created = True
        return self

    def __exit__(self, et, ev, tb) -> None:
        from surgeon.errors import CheckFailed

        failed = et is not None and not isinstance(ev, CheckFailed)
        try:
            if failed and self.created:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._lock is not None:
                _release(self._lock)
                self._lock = None
        if failed:
            for d in reversed(self._made):
                try:
                    os.rmdir(d)
                except OSError:
                    break


def builds(param: str = "out", default: str = "build"):
    """Decorator: run the function inside :class:`BuildFolder` for its ``param`` argument."""
    import functools
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            b = sig.bind(*a, **kw)
            b.apply_defaults()
            with BuildFolder(b.arguments.get(param) or default):
                return fn(*a, **kw)

        return wrapper

    return deco
