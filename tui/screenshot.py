"""Write an SVG screenshot of the chat UI after a real steered reply (for the README).

    python -m moe_gguf.tui.screenshot docs/tui.svg [MODEL.gguf]

Without a model: the demo model (see tui.session.default_model_path). Runs headless in a throwaway data dir.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path


async def _shoot(out: Path, model: str | None, prompt: str, size: tuple[int, int]) -> None:
    from moe_gguf.tui.app import MoEChatApp
    from moe_gguf.tui.config import Config, Sampling
    from moe_gguf.tui.testing import send, wait_ready

    app = MoEChatApp(model_path=model, n_ctx=1024, config=Config(), sampling=Sampling(0.0, 1.0, 48, 0), stable_stats=True)
    async with app.run_test(size=size) as pilot:
        await wait_ready(pilot)
        if not app.session.ready:
            raise SystemExit("the model did not load")
        topo = app.session.topology
        first, last = topo.moe_layers[0], topo.moe_layers[-1]
        app.session.add_entry(last, 1, "disable")
        app.session.add_entry(first, 2, "bias", 1.5)
        app.session.add_entry(last, 4, "scale", 2.0)
        app.session.profile.name = "demo"
        app.chat.refresh_steering()
        await pilot.press("ctrl+l")  # compare mode
        await send(pilot, prompt)
        app.chat.show_tab("tab-experts")
        app.clear_notifications()
        app.set_focus(None)
        await pilot.pause(0.2)
        out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=out.name, path=str(out.parent))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    out = Path(args[0]).resolve()
    model = args[1] if len(args) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOE_GGUF_DATA_DIR"] = tmp
        asyncio.run(_shoot(out, model, "Which experts does a steered reply use?", (140, 42)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
