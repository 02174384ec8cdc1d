"""Render a campaign report (``report/index.html``) with headless Chromium and save a PNG.

Usage: ``python scripts/report_screenshot.py RUN_OR_INDEX_HTML [--out PNG] [--width 1280] [--height N]``

A reviewer (or a test of the page's layout) sees the page as a browser draws it, without a
display. Chromium's ``--screenshot`` captures one window, so the window is made tall and the
blank page background below the content is trimmed off. Prints the PNG's path.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("error: no Chromium found (apt-get install -y chromium)")


def trim_bottom(path: Path, margin: int = 24) -> None:
    """Cut the rows below the last one that differs from the page background (bottom-left pixel)."""
    image = Image.open(path).convert("RGB")
    pixels = np.asarray(image)
    background = pixels[-1, 0]
    busy = np.nonzero((pixels != background).any(axis=(1, 2)))[0]
    if len(busy):
        bottom = min(pixels.shape[0], int(busy[-1]) + margin)
        image.crop((0, 0, pixels.shape[1], bottom)).save(path)


def screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if not out.exists():
        raise SystemExit(f"error: chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}")
    trim_bottom(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="run directory or its report/index.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default: report/screenshot.png beside the page)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=9000, help="window height; blank space below is trimmed")
    args = parser.parse_args(argv)
    page = args.target / "report" / "index.html" if args.target.is_dir() else args.target
    if not page.is_file():
        print(f"error: {page}: no report page (run: aimspax-like report RUN)", file=sys.stderr)
        return 2
    out = args.out or page.parent / "screenshot.png"
    print(screenshot(page, out, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
