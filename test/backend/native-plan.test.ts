// Recorded plans (Backend.recordPlan, native/ops_addon.cc planAdd/planRun): calls recorded once replay with
// the step's L, inside the arrays they were recorded over, and a call with no recordable kernel refuses the
// whole recording. (The decoding step's replay is compared bit for bit in test/models/llama.test.ts.)

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { makeNativeBackend, nativeOps } from '../../src/backend/cpu/native.ts';
import { tensor } from '../../src/ops/create.ts';

const addon = nativeOps();
const skip = addon?.planCreate ? false : 'the native addon is not built (npm run build:native)';
const f32 = (values: number[], shape = [values.length]) => tensor(values, shape);

test('a recorded copy marked dynamic writes L * step further on, and not past its array', { skip }, () => {
  const be = makeNativeBackend(addon!);
  const src = f32([1, 2, 3, 4]);
  const store = f32(new Array(12).fill(0));
  const dst = store.view([4], [1], 0);
  const plan = be.recordPlan!((dynamic) => {
    dynamic(4);
    be.copy(src, dst);
    be.binary('add', src, src, src); // static: doubles src at every run
  });
  assert.ok(plan, 'copy and binary are recordable');
  assert.deepEqual([...(store.data as Float32Array)], new Array(12).fill(0), 'recording runs nothing');
  plan.run(0, null);
  plan.run(2, null);
  assert.deepEqual([...(store.data as Float32Array)], [1, 2, 3, 4, 0, 0, 0, 0, 2, 4, 6, 8]);
  assert.throws(() => plan.run(3, null), /beyond the cache/);
  assert.throws(() => plan.run(-1, null), /integer >= 0/);
  plan.dispose();
  assert.throws(() => plan.run(0, null), RangeError, 'a freed plan refuses to run');
});

test('a call the addon cannot record refuses the recording; errors in the body still propagate', { skip }, () => {
  const be = makeNativeBackend(addon!);
  const x = f32([1, 2, 3, 4]);
  const y = f32([0, 0, 0, 0]);
  // unary is not a plan op
  assert.equal(
    be.recordPlan!(() => be.unary('exp', x, y)),
    null,
  );
  assert.deepEqual([...(y.data as Float32Array)], [0, 0, 0, 0], 'nothing ran');
  assert.throws(
    () =>
      be.recordPlan!(() => {
        throw new SyntaxError('mine');
      }),
    SyntaxError,
  );
  // a plain call after a refused recording runs again
  be.unary('exp', x, y);
  assert.ok(Math.abs((y.data as Float32Array)[0]! - Math.E) < 1e-6);
});
