"""Screenshots of the documentation site, as a 1280-px screen shows it.

    python tools/screenshot_docs.py                        # Home, Quickstart, two API pages
    python tools/screenshot_docs.py concepts/ api/viz/ --full-page --split
    python tools/screenshot_docs.py --site-dir /tmp/site --no-build index.html

Builds the site (``mkdocs build --strict --site-dir DIR``, a temporary folder unless
``--site-dir`` is given), serves it on ``127.0.0.1`` with ``http.server`` in a thread, and
takes the screenshots with headless Chromium (Debian: ``apt-get install chromium``):
``chromium --headless --no-sandbox --screenshot=FILE --window-size=1280,900 URL``, with a
``--virtual-time-budget`` so that the page's scripts (MathJax, bundled in
``docs/javascripts/mathjax``) have run. Nothing is fetched from the network.

Each page gives ``OUT/<name>.png``, its first screen; with ``--full-page`` also
``OUT/<name>-full.png``, the whole page (its height measured by a small script that the
server adds to a first, measuring request only), and with ``--split`` that page cut into
screens, ``OUT/<name>-full-01.png``, ... (needs Pillow). The output folder is never inside
the repository (default ``/tmp/cellkit-screens``).

Exit status: 0 when every screenshot was written, 1 when one failed, 2 for a usage error or
a failed build.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PAGES = ("index.html", "quickstart/", "api/losses/", "api/data/")
DEFAULT_OUT = Path("/tmp/cellkit-screens")
MEASURE_QUERY = "__screenshot_measure=1"

#: Added before ``</body>`` of a page requested with ``MEASURE_QUERY``: once the page has
#: loaded (and MathJax has typeset, when there is MathJax), it writes the page's height into
#: an attribute of ``<html>``, which ``chromium --dump-dom`` then prints.
MEASURE_SCRIPT = b"""<script>
(function () {
  function mark() {
    var d = document.documentElement, b = document.body;
    var h = Math.max(d.scrollHeight, d.offsetHeight, b ? b.scrollHeight : 0);
    d.setAttribute("data-screenshot-height", String(h));
  }
  window.addEventListener("load", function () {
    mark();
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) { mj.startup.promise.then(mark); }
    setTimeout(mark, 1500);
  });
})();
</script>
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pages", nargs="*", default=list(DEFAULT_PAGES),
                   help=f"pages, as paths of the site (default: {' '.join(DEFAULT_PAGES)})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--site-dir", type=Path, default=None,
                   help="build the site here (default: a temporary folder, removed at the end)")
    p.add_argument("--no-build", action="store_true", help="use the site already in --site-dir")
    p.add_argument("--width", type=int, default=1280, help="window width, pixels (default 1280)")
    p.add_argument("--height", type=int, default=900, help="window height, pixels (default 900)")
    p.add_argument("--full-page", action="store_true", help="also the whole page, OUT/<name>-full.png")
    p.add_argument("--split", action="store_true", help="with --full-page: also cut it into screens")
    p.add_argument("--max-height", type=int, default=16000, help="cap of a full page's height (default 16000)")
    p.add_argument("--budget-ms", type=int, default=8000,
                   help="virtual time for the page's scripts, milliseconds (default 8000)")
    p.add_argument("--chromium", default=None, help="the browser (default: chromium, chromium-browser or "
                   "google-chrome on PATH)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per browser run (default 120)")
    args = p.parse_args(argv)
    if args.no_build and args.site_dir is None:
        p.error("--no-build needs --site-dir")
    if args.split and not args.full_page:
        p.error("--split needs --full-page")
    out = args.out.resolve()
    if out == REPO or out.is_relative_to(REPO):
        p.error(f"--out {args.out} is inside the repository ({REPO}); choose a folder outside it")
    return args


def find_chromium(given: str | None) -> str:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("screenshot_docs: no Chromium found (Debian: apt-get install chromium); or pass --chromium PATH")


def build_site(site: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    print("building:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        problems = "\n".join(line for line in out.splitlines() if "WARNING" in line or "ERROR" in line)
        print(f"screenshot_docs: mkdocs build --strict failed:\n{problems or out[-4000:]}", file=sys.stderr)
        sys.exit(2)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; a page asked for with ``MEASURE_QUERY`` gets ``MEASURE_SCRIPT``."""

    def do_GET(self) -> None:  # http.server calls it by this name
        parts = urlsplit(self.path)
        if MEASURE_QUERY not in parts.query:
            return super().do_GET()
        path = Path(self.translate_path(parts.path))
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file() or path.suffix != ".html":
            return super().do_GET()
        body = path.read_bytes()
        body = body.replace(b"</body>", MEASURE_SCRIPT + b"</body>", 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def page_name(page: str) -> str:
    name = page.strip("/").removesuffix(".html").removesuffix("/index") or "index"
    return re.sub(r"[^\w.-]+", "-", name)


def chromium_run(browser: str, profile: Path, size: tuple[int, int], extra: list[str], url: str,
                 args: argparse.Namespace) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
           f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={args.budget_ms}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)


def page_height(browser: str, profile: Path, url: str, args: argparse.Namespace) -> int | None:
    sep = "&" if "?" in url else "?"
    proc = chromium_run(browser, profile, (args.width, args.height), ["--dump-dom"], url + sep + MEASURE_QUERY,
                        args)
    m = re.search(r'data-screenshot-height="(\d+)"', proc.stdout)
    return int(m.group(1)) if m else None


def screenshot(browser: str, profile: Path, url: str, path: Path, size: tuple[int, int],
               args: argparse.Namespace) -> bool:
    path.unlink(missing_ok=True)
    proc = chromium_run(browser, profile, size, [f"--screenshot={path}"], url, args)
    if not path.is_file():
        print(f"  failed: {url} -> {path}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return False
    print(f"  {path} ({size[0]}x{size[1]})", file=sys.stderr)
    return True


def split_screens(path: Path, height: int) -> list[Path]:
    from PIL import Image

    image = Image.open(path)
    pieces = []
    for i, top in enumerate(range(0, image.height, height), start=1):
        piece = path.with_name(f"{path.stem}-{i:02d}.png")
        image.crop((0, top, image.width, min(top + height, image.height))).save(piece)
        pieces.append(piece)
    return pieces


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    browser = find_chromium(args.chromium)
    temporary = args.site_dir is None
    site = Path(tempfile.mkdtemp(prefix="cellkit-site-")) if temporary else args.site_dir.resolve()
    profile = Path(tempfile.mkdtemp(prefix="cellkit-chromium-"))
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    server = None
    try:
        if not args.no_build:
            build_site(site)
        server, base = serve(site)
        for page in args.pages:
            rel = page.lstrip("/")
            if not (site / rel).exists() and not (site / rel / "index.html").exists():
                print(f"{page}: not in the site {site}", file=sys.stderr)
                failed += 1
                continue
            url, name = base + rel, page_name(page)
            print(f"{page}: {url}", file=sys.stderr)
            ok = screenshot(browser, profile, url, args.out / f"{name}.png", (args.width, args.height), args)
            if ok and args.full_page:
                height = page_height(browser, profile, url, args)
                if height is None:
                    print("  could not measure the page's height; the full page is left out", file=sys.stderr)
                    ok = False
                else:
                    full = args.out / f"{name}-full.png"
                    size = (args.width, max(args.height, min(height, args.max_height)))
                    if height > args.max_height:
                        print(f"  the page is {height} px high: its first {args.max_height} px are shown "
                              "(--max-height)", file=sys.stderr)
                    ok = screenshot(browser, profile, url, full, size, args)
                    if ok and args.split:
                        pieces = split_screens(full, args.height)
                        print(f"  cut into {len(pieces)} screens: {pieces[0].name} ...", file=sys.stderr)
            failed += not ok
    finally:
        if server is not None:
            server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
        if temporary:
            shutil.rmtree(site, ignore_errors=True)
    print(f"screenshots in {args.out}" + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
