import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, test } from 'node:test';
import { AtomicFile, withAtomicFile, writeFileAtomic, writeFileAtomicSync } from '../../src/formats/atomic.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lowrank-atomic-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

const leftovers = () => fs.readdirSync(tmp).filter((f) => f.endsWith('.tmp'));

test('writes bytes, text, sync and async chunks; replaces an existing file', async () => {
  const p = path.join(tmp, 'a.bin');
  await writeFileAtomic(p, new Uint8Array([1, 2, 3]));
  assert.deepEqual([...fs.readFileSync(p)], [1, 2, 3]);
  await writeFileAtomic(p, 'héllo');
  assert.equal(fs.readFileSync(p, 'utf8'), 'héllo');
  await writeFileAtomic(p, [new Uint8Array([4]), new Uint8Array([5, 6])]);
  assert.deepEqual([...fs.readFileSync(p)], [4, 5, 6]);
  async function* gen() {
    yield new Uint8Array([7]);
    yield new Uint8Array([8]);
  }
  await writeFileAtomic(p, gen());
  assert.deepEqual([...fs.readFileSync(p)], [7, 8]);
  writeFileAtomicSync(p, 'sync');
  assert.equal(fs.readFileSync(p, 'utf8'), 'sync');
  writeFileAtomicSync(p, [new Uint8Array([9])]);
  assert.deepEqual([...fs.readFileSync(p)], [9]);
  assert.deepEqual(leftovers(), []);
});

test('a failure while streaming leaves the old file and no temp file', async () => {
  const p = path.join(tmp, 'keep.txt');
  fs.writeFileSync(p, 'old');
  await assert.rejects(
    withAtomicFile(p, async (f) => {
      await f.write('new part');
      assert.equal(f.bytesWritten, 8);
      assert.ok(fs.existsSync(f.tempPath));
      throw new Error('boom');
    }),
    /boom/,
  );
  assert.equal(fs.readFileSync(p, 'utf8'), 'old');
  function* bad(): Generator<Uint8Array> {
    yield new Uint8Array([1]);
    throw new Error('producer failed');
  }
  assert.throws(() => writeFileAtomicSync(p, bad()), /producer failed/);
  await assert.rejects(writeFileAtomic(p, bad()), /producer failed/);
  assert.equal(fs.readFileSync(p, 'utf8'), 'old');
  assert.deepEqual(leftovers(), []);
});

test('the temp file lives in the target folder; commit is explicit with AtomicFile', async () => {
  const p = path.join(tmp, 'explicit.txt');
  const f = await AtomicFile.open(p);
  assert.equal(path.dirname(f.tempPath), tmp);
  await f.write('x');
  assert.ok(!fs.existsSync(p));
  await f.commit();
  assert.equal(fs.readFileSync(p, 'utf8'), 'x');
  await assert.rejects(f.write('y'), /after commit/);
  const g = await AtomicFile.open(p);
  await g.write('discard');
  await g.abort();
  assert.equal(fs.readFileSync(p, 'utf8'), 'x');
  assert.deepEqual(leftovers(), []);
});

test('writing into a missing folder fails without creating anything', async () => {
  await assert.rejects(writeFileAtomic(path.join(tmp, 'no', 'such', 'f'), 'x'), { code: 'ENOENT' });
});
