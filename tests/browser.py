"""Open a report page in headless Chromium (Debian's package) and count its images."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium")

# Marks the page once everything has loaded: how many images there are and how many did
# not decode. Added to a copy of the page only; the report itself has no script.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-probe", images.length + ":" + broken.length);
});
</script>"""


def chromium(*arguments: str, profile: Path) -> str:
    """Run headless Chromium with ``arguments``; return what it printed."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root in containers
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *arguments,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def rendered_images(page: Path, profile: Path) -> tuple[int, int, str]:
    """(images on the loaded page, images that did not decode, the rendered DOM).

    The probe goes into a copy of the page beside it, so relative image paths hold.
    """
    probed = page.with_name("probed-" + page.name)
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    try:
        dom = chromium("--dump-dom", probed.as_uri(), profile=profile)
    finally:
        probed.unlink()
    found = re.search(r'data-probe="(\d+):(\d+)"', dom)
    assert found is not None, dom[-2000:]
    return int(found[1]), int(found[2]), dom
