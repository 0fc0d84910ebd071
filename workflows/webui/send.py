"""Send a shared CoDi payload to a running Automatic1111 or Forge (started with ``--api``) and save the images.

    python workflows/webui/send.py workflows/webui/txt2img_codi_sr_x4.json --image low.png
    python workflows/webui/send.py workflows/webui/img2img_codi_sr_x4.json --image low.png --init photo.png \\
        --url http://127.0.0.1:7860 --out results/

The payload's ``"<base64 PNG: ...>"`` placeholders are filled: the ControlNet unit's ``image`` with ``--image``, an
img2img payload's ``init_images`` with ``--init``. The unit's ``model`` may be a file's stem (``codi_sr_x4``): it is
replaced by the name the server lists under ``/controlnet/model_list`` (Forge accepts only that exact
``name [hash]``; sd-webui-controlnet on A1111 accepts both). ``--width``/``--height`` override the payload's size.

Only the standard library is used, so any Python 3.9+ runs it. A refusal (an adapter for another base model, a
condition image of the wrong size, ...) is printed as the server's one-line reason, with exit code 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

PLACEHOLDER = "<base64 PNG"
ENDPOINTS = {"txt2img": "/sdapi/v1/txt2img", "img2img": "/sdapi/v1/img2img"}


class SendError(Exception):
    """A problem the user can fix; printed without a traceback."""


def encode_png(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SendError(f"cannot read {path}: {e.strerror}") from None
    return base64.b64encode(data).decode("ascii")


def request(url: str, payload: dict | None = None, timeout: float = 3600) -> dict:
    """GET (``payload`` None) or POST JSON; the decoded answer. HTTP errors become :class:`SendError` with the
    server's reason (A1111 puts it in ``errors``, Forge in ``message``; both also in ``detail``)."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read().decode("utf-8"))
        except ValueError:
            body = {}
        reason = body.get("errors") or body.get("message") or body.get("detail") or e.reason
        raise SendError(f"the server refused the request (HTTP {e.code}): {reason}") from None
    except urllib.error.URLError as e:
        raise SendError(f"cannot reach {url}: {e.reason} (is the web UI running with --api?)") from None


def listed_model(url: str, model: str) -> str:
    """The server's name for ``model`` (a stem or a listed name)."""
    names = request(f"{url}/controlnet/model_list?update=true").get("model_list", [])
    for name in names:
        if model in (name, name.split(" [")[0]):
            return name
    listed = ", ".join(n for n in names if n.lower() != "none") or "none"
    raise SendError(f"ControlNet model {model!r} is not in the web UI's models/ControlNet folder (listed: {listed})")


def fill(payload: dict, url: str, image: Path | None, init: Path | None) -> dict:
    """The payload with its placeholders filled and the units' models named as the server lists them."""
    units = payload.get("alwayson_scripts", {}).get("controlnet", {}).get("args", [])
    for unit in units:
        if str(unit.get("image", "")).startswith(PLACEHOLDER):
            if image is None:
                raise SendError(f"the payload's ControlNet unit needs an image: pass --image ({unit['image']})")
            unit["image"] = encode_png(image)
        if unit.get("model"):
            unit["model"] = listed_model(url, unit["model"])
    inits = payload.get("init_images")
    if inits and str(inits[0]).startswith(PLACEHOLDER):
        if init is None:
            raise SendError(f"an img2img payload needs the image to start from: pass --init ({inits[0]})")
        payload["init_images"] = [encode_png(init)]
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("payload", type=Path, help="a JSON payload, e.g. workflows/webui/txt2img_codi_sr_x4.json")
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the web UI (default %(default)s)")
    parser.add_argument("--image", type=Path, help="the ControlNet unit's condition image (SR: the low-res photo)")
    parser.add_argument("--init", type=Path, help="img2img: the image to start from")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the images (default: here)")
    args = parser.parse_args(argv)
    try:
        payload = json.loads(args.payload.read_text(encoding="utf-8"))
        kind = "img2img" if "init_images" in payload else "txt2img"
        payload = fill(payload, args.url.rstrip("/"), args.image, args.init)
        payload.update({k: v for k, v in (("width", args.width), ("height", args.height)) if v})
        answer = request(args.url.rstrip("/") + ENDPOINTS[kind], payload)
        args.out.mkdir(parents=True, exist_ok=True)
        info = json.loads(answer.get("info") or "{}")
        for i, image in enumerate(answer.get("images", [])):
            path = args.out / f"{args.payload.stem}_{i}.png"
            path.write_bytes(base64.b64decode(image))
            print(f"saved {path}")
        for text in info.get("infotexts", [])[:1]:
            print(text)
    except (OSError, ValueError, SendError) as e:
        print(f"send.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
