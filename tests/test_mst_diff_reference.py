"""diff_trees against the official implementation: ``DataDiff.of`` of ``@atproto/repo``
(installed with the reference PDS), on the same random trees.

Both sides build the trees from the same keys and values; the roots must agree (the MST is
canonical), and so must what changed: the keys created or updated, the keys deleted, and the
MST nodes the new tree adds and the old one loses.
"""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

from atsync.atproto import CID, diff_trees, encode_dag_cbor
from atsync.atproto._devpds_install import InstallInfo
from atsync.atproto._mst import build_mst

# Reads [{old: [[key, cid]...], new: [...]}...], writes what DataDiff.of(new, old) says.
_DATA_DIFF_JS = """
const { MST, MemoryBlockstore, DataDiff } = require('@atproto/repo')
const { parseCid } = require('@atproto/lex-data')
async function build(store, items) {
  let mst = await MST.create(store)
  for (const [k, v] of items) mst = await mst.add(k, parseCid(v))
  return mst
}
async function main() {
  const out = []
  for (const c of JSON.parse(require('fs').readFileSync(0, 'utf8'))) {
    const store = new MemoryBlockstore()
    const prev = await build(store, c.old)
    const curr = await build(store, c.new)
    const diff = await DataDiff.of(curr, prev)
    out.push({
      oldRoot: (await prev.getPointer()).toString(),
      newRoot: (await curr.getPointer()).toString(),
      upserts: [...diff.addList(), ...diff.updateList()].map(a => a.key).sort(),
      deletes: diff.deleteList().map(d => d.key).sort(),
      newNodes: [...diff.newMstBlocks.cids()].map(c => c.toString()).sort(),
      removed: diff.removedCids.toList().map(c => c.toString()),
    })
  }
  process.stdout.write(JSON.stringify(out))
}
main().catch(e => { console.error(e); process.exit(1) })
"""


def _reference(install: InstallInfo, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(install.node), "-e", _DATA_DIFF_JS],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=install.install_dir,
        env={"NODE_PATH": str(install.install_dir / "node_modules"), "PATH": ""},
    ).stdout
    answers: list[dict[str, Any]] = json.loads(out)
    return answers


def _pairs(items: dict[str, CID]) -> list[list[str]]:
    return [[k, str(v)] for k, v in items.items()]


def _case(rng: random.Random) -> tuple[dict[str, CID], dict[str, CID]]:
    def value() -> CID:
        return CID.for_data(encode_dag_cbor({"n": rng.getrandbits(40)}))

    def key() -> str:
        return f"{rng.choice(['app.a.post', 'app.b.like'])}/{rng.getrandbits(48):012x}"

    old = {key(): value() for _ in range(rng.choice([0, 1, 5, 40, 300, 1200]))}
    new = dict(old)
    for k in rng.sample(sorted(old), min(len(old), rng.randint(0, 30))):
        del new[k]
    for k in rng.sample(sorted(new), min(len(new), rng.randint(0, 30))):
        new[k] = value()
    for _ in range(rng.randint(0, 30)):
        new[key()] = value()
    return old, new


def test_diff_trees_agrees_with_the_official_data_diff(pds_install: InstallInfo) -> None:
    rng = random.Random(20261201)
    cases = [_case(rng) for _ in range(40)]
    answers = _reference(
        pds_install,
        [
            {
                "old": [[k, str(v)] for k, v in old.items()],
                "new": [[k, str(v)] for k, v in new.items()],
            }
            for old, new in cases
        ],
    )
    for (old, new), ref in zip(cases, answers, strict=True):
        old_root, old_nodes = build_mst(old)
        new_root, new_nodes = build_mst(new)
        assert (str(old_root), str(new_root)) == (ref["oldRoot"], ref["newRoot"])
        delta = {cid: data for cid, data in new_nodes.items() if cid not in old_nodes}
        diff = diff_trees(new_root, delta, old_root, old_nodes)
        upserts = sorted(k for k, v in diff.added.items() if old.get(k) != v)
        deletes = sorted(set(diff.removed) - set(diff.added))
        assert (upserts, deletes) == (ref["upserts"], ref["deletes"])
        assert sorted(str(c) for c in diff.new_nodes) == ref["newNodes"]
        # The reference lists removed nodes and removed record CIDs together.
        assert {str(c) for c in diff.gone_nodes} <= set(ref["removed"])
        assert {str(c) for c in diff.gone_nodes} == set(ref["removed"]) - {
            str(v) for v in old.values()
        }
