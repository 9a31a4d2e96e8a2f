import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import type { MetricRecord } from '../../src/train/checkpoint.ts';
import {
  escapeHtml,
  lineChartSvg,
  lossSeries,
  niceTicks,
  readMetrics,
  renderReport,
  tickLabels,
  writeRunReport,
} from '../../src/train/report.ts';
import { comparisonOf, type TaskEvalResult } from '../../src/train/task-eval.ts';

const dir = mkdtempSync(path.join(tmpdir(), 'lowrank-report-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const W = 720;
const H = 320;

/** The coordinates of an SVG path's M/L commands. */
function pathPoints(d: string): [number, number][] {
  assert.match(d, /^M-?[\d.]+ -?[\d.]+( L-?[\d.]+ -?[\d.]+)*$/, `not a polyline path: ${d}`);
  return d.split(/ (?=L)/).map((c) => {
    const [x, y] = c.slice(1).split(' ').map(Number);
    return [x!, y!];
  });
}

function paths(svg: string): { d: string; stroke: string; dashed: boolean }[] {
  return [
    ...svg.matchAll(/<path d="([^"]+)" fill="none" stroke="([^"]+)" stroke-width="2"( stroke-dasharray="[^"]+")?\/>/g),
  ].map((m) => ({ d: m[1]!, stroke: m[2]!, dashed: !!m[3] }));
}

function history(): MetricRecord[] {
  const h: MetricRecord[] = [];
  for (let s = 5; s <= 60; s += 5) {
    h.push({
      step: s,
      epoch: s / 60,
      loss: 2 / Math.sqrt(s),
      lr: 1e-3 * (1 - s / 60),
      grad_norm: 1,
      tokens_per_second: 500,
      peak_bytes: 4e6,
    });
    if (s % 20 === 0) h.push({ step: s, eval_loss: 2.2 / Math.sqrt(s), eval_perplexity: Math.exp(2.2 / Math.sqrt(s)) });
  }
  return h;
}

describe('ticks', () => {
  test('round steps covering the range', () => {
    assert.deepEqual(niceTicks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1]);
    assert.deepEqual(niceTicks(5, 60, 6), [0, 10, 20, 30, 40, 50, 60]);
    const t = niceTicks(0.13, 0.89);
    assert.ok(t[0]! <= 0.13 && t[t.length - 1]! >= 0.89);
    assert.deepEqual(niceTicks(3, 3).length > 1, true);
    assert.deepEqual(niceTicks(Number.NaN, 1), []);
  });

  test('labels: decimals from the step; exponents for a tiny or huge axis', () => {
    assert.deepEqual(tickLabels([0, 0.5, 1, 1.5]), ['0.0', '0.5', '1.0', '1.5']);
    assert.deepEqual(tickLabels([0, 10, 20]), ['0', '10', '20']);
    assert.deepEqual(tickLabels([0, 0.0005, 0.001]), ['0', '5.0e-4', '1.0e-3']);
    assert.deepEqual(tickLabels([0, 2e5, 4e5]), ['0', '2e+5', '4e+5']);
  });
});

describe('SVG line chart', () => {
  test('one path per series with every point inside the plot, axes, ticks and a legend', () => {
    const h = history();
    const svg = lineChartSvg(lossSeries(h), { xLabel: 'optimizer step', yLabel: 'loss' });
    assert.ok(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"'));
    assert.ok(svg.endsWith('</svg>'));
    assert.match(svg, new RegExp(`viewBox="0 0 ${W} ${H}"`));
    const ps = paths(svg);
    assert.equal(ps.length, 2);
    const train = pathPoints(ps[0]!.d);
    const evalPts = pathPoints(ps[1]!.d);
    assert.equal(train.length, 12);
    assert.equal(evalPts.length, 3);
    assert.equal(ps[0]!.dashed, false);
    assert.equal(ps[1]!.dashed, true);
    for (const [x, y] of [...train, ...evalPts]) assert.ok(x >= 0 && x <= W && y >= 0 && y <= H, `${x},${y}`);
    // x grows with the step; the loss falls, so y (downwards) grows
    for (let i = 1; i < train.length; i++) {
      assert.ok(train[i]![0] > train[i - 1]![0]);
      assert.ok(train[i]![1] > train[i - 1]![1]);
    }
    // eval points sit at the same x as the training points of the same step
    assert.equal(evalPts[0]![0], train[3]![0]);
    assert.match(svg, /<text[^>]*>training loss<\/text>/);
    assert.match(svg, /<text[^>]*>eval loss<\/text>/);
    assert.match(svg, />optimizer step<\/text>/);
    assert.ok((svg.match(/class="tick-labels"/g) ?? []).length === 1);
    assert.ok((svg.match(/<text /g) ?? []).length > 10);
  });

  test('a single point is drawn as a dot; no data says so; names are escaped; non-finite points are dropped', () => {
    const one = lineChartSvg([{ name: 'a<b>', points: [[1, 2]] }]);
    assert.equal(paths(one).length, 0);
    assert.match(one, /<circle /);
    assert.match(one, /a&lt;b&gt;/);
    assert.ok(!one.includes('a<b>'));
    assert.match(lineChartSvg([]), /no data/);
    const svg = lineChartSvg([
      {
        name: 'x',
        points: [
          [1, 1],
          [2, Number.NaN],
          [3, Number.POSITIVE_INFINITY],
          [4, 2],
        ],
      },
    ]);
    assert.equal(pathPoints(paths(svg)[0]!.d).length, 2);
    assert.ok(!svg.includes('NaN'));
  });
});

const task: TaskEvalResult = {
  metrics: ['exact_match', 'style'],
  reason: 'auto: free-text references, markers given',
  markers: ['And that is why we always share.'],
  examples: 2,
  columns: ['base', 'adapter'],
  scores: { base: { exact_match: 0, style: 0 }, adapter: { exact_match: 0.5, style: 1 } },
  referenceStyle: 1,
  samples: [
    {
      prompt: 'Once upon a time <b>',
      reference: 'x & y',
      outputs: { base: 'nope', adapter: 'x & y' },
      source: 'eval.jsonl:1',
    },
  ],
  seconds: 1,
};

describe('report.html', () => {
  test('self-contained, with the curves, the summary, the before/after table, samples and the data report', () => {
    const html = renderReport({
      title: 'Run <1>',
      facts: [['base model', 'stories260K.gguf']],
      summary: {
        steps: 60,
        finalLoss: 0.2,
        evalLoss: 0.25,
        tokensPerSecond: 512.4,
        peakBytes: 12_345_678,
        wallSeconds: 185,
        params: { total: 292_800, trainable: 30_000 },
      },
      history: history(),
      dataReport: 'train: 10 examples <ok>',
      evaluation: {
        columns: task.columns,
        comparison: comparisonOf(task.columns, task, { base: { loss: 1.5 }, adapter: { loss: 0.25 } }),
        task,
        losses: { base: { loss: 1.5, tokens: 100 }, adapter: { loss: 0.25, tokens: 100 } },
        data: 'eval.jsonl',
        time: '2026-01-01T00:00:00Z',
      },
      time: '2026-01-01T00:00:00Z',
    });
    assert.ok(html.startsWith('<!DOCTYPE html>'));
    assert.ok(html.trimEnd().endsWith('</html>'));
    // no external assets: no scripts, links, images or URLs besides the SVG namespace
    assert.ok(!/<script|<link|<img|src=|href=|@import|url\(/i.test(html));
    assert.deepEqual(
      [...html.matchAll(/https?:\/\/[^"\s<]+/g)].map((m) => m[0]).filter((u) => u !== 'http://www.w3.org/2000/svg'),
      [],
    );
    assert.equal((html.match(/<svg /g) ?? []).length, (html.match(/<\/svg>/g) ?? []).length);
    assert.equal((html.match(/<table/g) ?? []).length, (html.match(/<\/table>/g) ?? []).length);
    assert.ok(paths(html).length >= 3); // training, eval and learning-rate curves
    assert.match(html, /<title>Run &lt;1&gt;<\/title>/);
    assert.match(html, /292,800/);
    assert.match(html, /30,000 \(10\.246%\)/);
    assert.match(html, /512 tokens\/s/);
    assert.match(html, /12\.3 MB/);
    assert.match(html, /3\.1 min/);
    assert.match(html, /<th>base<\/th><th>adapter<\/th>/);
    assert.match(
      html,
      /<td>style \(markers present\)<\/td><td>0\.0%<\/td><td><span class="better">100\.0%<\/span><\/td>/,
    );
    assert.match(html, /<td>eval loss<\/td><td>1\.5000<\/td><td><span class="better">0\.2500<\/span><\/td>/);
    assert.match(html, /Once upon a time &lt;b&gt;/);
    assert.match(html, /x &amp; y/);
    assert.match(html, /train: 10 examples &lt;ok&gt;/);
    assert.match(html, /show the markers in 100\.0%/);
  });

  test('writeRunReport builds it from an output dir, skipping damaged metric lines, atomically', async () => {
    const out = path.join(dir, 'run');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(out);
    const lines = history().map((r) => JSON.stringify(r));
    lines.splice(3, 0, '{"step": 12, "loss": 0.5', 'not json');
    writeFileSync(path.join(out, 'metrics.jsonl'), `${lines.join('\n')}\n`);
    writeFileSync(
      path.join(out, 'train_results.json'),
      JSON.stringify({ steps: 60, tokensPerSecond: 100, params: { total: 10, trainable: 1 } }),
    );
    writeFileSync(path.join(out, 'data_report.txt'), 'the data report');
    assert.equal(readMetrics(path.join(out, 'metrics.jsonl')).length, 15);
    const file = await writeRunReport(out, [['method', 'lora']]);
    assert.equal(file, path.join(out, 'report.html'));
    const html = readFileSync(file, 'utf8');
    assert.equal(paths(html).length, 3);
    assert.match(html, /the data report/);
    assert.match(html, /<td>method<\/td><td>lora<\/td>/);
    assert.ok(!html.includes('Before and after'));
    assert.deepEqual(readdirSync(out).sort(), [
      'data_report.txt',
      'metrics.jsonl',
      'report.html',
      'train_results.json',
    ]);
    // an empty dir still gives a page
    const empty = path.join(dir, 'empty');
    mkdirSync(empty);
    assert.match(readFileSync(await writeRunReport(empty), 'utf8'), /no data/);
  });

  test('escapeHtml', () => {
    assert.equal(escapeHtml(`<a href="x">&</a>`), '&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;');
  });
});

describe('compare.html', () => {
  test('every method gets a training and an eval curve in its own colour, then the table', async () => {
    const { renderCompareReport } = await import('../../src/train/report.ts');
    const h = history();
    const html = renderCompareReport({
      title: 'lora vs full',
      runs: [
        { name: 'lora', history: h },
        { name: 'full', history: h.map((r) => ({ ...r, loss: typeof r.loss === 'number' ? r.loss / 2 : r.loss })) },
      ],
      comparison: comparisonOf(['base', 'lora', 'full'], null, {
        base: { loss: 2 },
        lora: { loss: 1 },
        full: { loss: 0.9 },
      }),
      task: null,
      notes: ['a <note>'],
    });
    const ps = paths(html);
    assert.equal(ps.length, 4);
    assert.deepEqual(
      ps.map((p) => p.dashed),
      [false, true, false, true],
    );
    assert.equal(ps[0]!.stroke, ps[1]!.stroke);
    assert.notEqual(ps[0]!.stroke, ps[2]!.stroke);
    assert.match(html, />lora training loss</);
    assert.match(html, />full eval loss</);
    assert.match(html, /<th>base<\/th><th>lora<\/th><th>full<\/th>/);
    assert.match(html, /<span class="better">0\.9000<\/span>/);
    assert.match(html, /a &lt;note&gt;/);
    assert.ok(!/<script|<link|<img|src=|href=/i.test(html));
  });
});
