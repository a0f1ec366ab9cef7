"""The Storage SCP alone in a process of its own, for tests that measure the node's memory.

``python tests/scp_process.py SETTINGS_JSON``: listens with those settings, prints ``ready`` and
serves until its standard input closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.settings import Settings  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from node.scp import StorageSCP  # noqa: E402
from node.storage import InstanceStore  # noqa: E402


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(settings.ledger_url)
    scp = StorageSCP(settings, ledger, InstanceStore(settings.storage_dir))
    scp.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        scp.stop()
        ledger.close()


if __name__ == "__main__":
    main()
