// Generates the invoice-extraction dataset: plain-text invoices in several layouts, date formats, number
// formats and currencies, each with the JSON a model should extract: {"vendor", "date" (ISO 8601), "total"
// (a number), "currency" (ISO 4217)}. Completion records: the prompt holds the instructions and the invoice,
// the completion the JSON (the only trained tokens). Evaluated by field-level F1 (`lowrank eval --metric
// json_f1`, or 'auto': every reference is a JSON object).
//
//   node --import tsx examples/invoice-extraction/make-data.ts      (writes train.jsonl and eval.jsonl here)

import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { makeSplits, Picker, toJsonl } from '../rng.ts';

export const SEED = 7;
export const TRAIN_COUNT = 1200;
export const EVAL_COUNT = 100;

export const INSTRUCTION =
  'Extract the vendor, the invoice date (YYYY-MM-DD), the total amount due (a number) and the currency (ISO code) from the invoice below. Answer with one JSON object with the keys vendor, date, total and currency.';

const VENDORS = [
  'Acme Office Supplies Ltd',
  'Blue River Coffee Co.',
  'Nordlicht Elektronik GmbH',
  'Maison Dupont SARL',
  'Greenfield Landscaping LLC',
  'Tokyo Print Works K.K.',
  'Baltic Timber AB',
  'Sunrise Catering',
  'Iberia Logistics S.L.',
  'Northwind Traders',
  'Helvetic Watches AG',
  'Pixel Perfect Design Studio',
];

const CURRENCIES: { code: string; symbol: string; decimals: number; style: 'us' | 'eu' | 'ch' }[] = [
  { code: 'USD', symbol: '$', decimals: 2, style: 'us' },
  { code: 'EUR', symbol: '€', decimals: 2, style: 'eu' },
  { code: 'GBP', symbol: '£', decimals: 2, style: 'us' },
  { code: 'CHF', symbol: 'CHF', decimals: 2, style: 'ch' },
  { code: 'JPY', symbol: '¥', decimals: 0, style: 'us' },
  { code: 'SEK', symbol: 'kr', decimals: 2, style: 'eu' },
];

const ITEMS = [
  'Printer paper A4 (box)',
  'Espresso beans 1kg',
  'USB-C cable',
  'Consulting hours',
  'Garden maintenance',
  'Business cards (500)',
  'Pine boards 2m',
  'Lunch buffet per person',
  'Freight Madrid-Lyon',
  'Logo design',
  'Watch strap, leather',
  'Monitor stand',
];

const MONTHS = [
  'January',
  'February',
  'March',
  'April',
  'May',
  'June',
  'July',
  'August',
  'September',
  'October',
  'November',
  'December',
];

const pad2 = (n: number) => String(n).padStart(2, '0');

/** An amount in minor units as the invoice prints it: 1,234.50 (us), 1.234,50 (eu) or 1'234.50 (ch). */
export function formatAmount(minor: number, decimals: number, style: 'us' | 'eu' | 'ch'): string {
  const whole = Math.floor(minor / 10 ** decimals);
  const frac = decimals ? String(minor % 10 ** decimals).padStart(decimals, '0') : '';
  const sep = style === 'us' ? ',' : style === 'eu' ? '.' : "'";
  const point = style === 'eu' ? ',' : '.';
  const grouped = String(whole).replace(/\B(?=(\d{3})+(?!\d))/g, sep);
  return decimals ? `${grouped}${point}${frac}` : grouped;
}

export function makeInvoice(p: Picker): { prompt: string; completion: string } {
  const vendor = p.pick(VENDORS);
  const cur = p.pick(CURRENCIES);
  const [y, m, d] = [p.int(2022, 2025), p.int(1, 12), p.int(1, 28)];
  const iso = `${y}-${pad2(m)}-${pad2(d)}`;
  const dateText = p.pick([
    iso,
    `${pad2(d)}/${pad2(m)}/${y}`,
    `${MONTHS[m - 1]} ${d}, ${y}`,
    `${d} ${MONTHS[m - 1]} ${y}`,
    `${pad2(d)}.${pad2(m)}.${y}`,
  ]);
  const scale = cur.decimals === 0 ? 1 : 100;
  const unit = cur.code === 'JPY' ? 100 : 1;
  const lines = p.sample(ITEMS, p.int(1, 4)).map((name) => {
    const qty = p.int(1, 12);
    const price = p.int(2, 400) * scale * unit + (cur.decimals ? p.pick([0, 50, 99, 25]) : 0);
    return { name, qty, price };
  });
  const subtotal = lines.reduce((s, l) => s + l.qty * l.price, 0);
  const taxRate = p.pick([0, 7, 8.1, 19, 20, 25]);
  const tax = Math.round((subtotal * taxRate) / 100);
  const total = subtotal + tax;
  const money = (minor: number) => {
    const a = formatAmount(minor, cur.decimals, cur.style);
    return cur.symbol.length > 1
      ? `${cur.symbol} ${a}`
      : cur.style === 'eu'
        ? `${a} ${cur.symbol}`
        : `${cur.symbol}${a}`;
  };
  const number = `INV-${p.int(1000, 9999)}-${p.int(10, 99)}`;
  const layout = p.int(0, 2);
  const itemLines = lines.map((l) => `${l.qty} x ${l.name} @ ${money(l.price)} = ${money(l.qty * l.price)}`);
  let text: string;
  if (layout === 0) {
    text = [
      vendor,
      `Invoice ${number}`,
      `Date: ${dateText}`,
      '',
      ...itemLines,
      '',
      `Subtotal: ${money(subtotal)}`,
      `Tax (${taxRate}%): ${money(tax)}`,
      `TOTAL DUE: ${money(total)}`,
    ].join('\n');
  } else if (layout === 1) {
    text = [
      `INVOICE No. ${number}    Issued ${dateText}`,
      `From: ${vendor}`,
      `Bill to: ${p.pick(['Jane Roe', 'Contoso Ltd', 'M. Rossi', 'Fabrikam Inc.'])}`,
      ...itemLines.map((l) => `- ${l}`),
      `Amount due ${money(total)} (incl. ${taxRate}% tax ${money(tax)})`,
    ].join('\n');
  } else {
    text = [
      `${vendor.toUpperCase()} | ${number}`,
      `${p.pick(['Invoice date', 'Date of issue', 'Dated'])}: ${dateText}`,
      `Items: ${lines.map((l) => `${l.name} (${l.qty})`).join('; ')}`,
      `Net ${money(subtotal)}, VAT ${money(tax)}, Total ${money(total)}`,
      `Payment within 30 days. ${p.pick(['Thank you for your business.', 'Questions? Reply to this email.', ''])}`.trim(),
    ].join('\n');
  }
  const answer = { vendor, date: iso, total: total / scale, currency: cur.code };
  return { prompt: `${INSTRUCTION}\n\nInvoice:\n${text}\n\nJSON:`, completion: ` ${JSON.stringify(answer)}` };
}

export function makeInvoiceData(seed = SEED): { train: string; eval: string } {
  const p = new Picker(seed);
  const { train, eval: evalSet } = makeSplits(p, makeInvoice, TRAIN_COUNT, EVAL_COUNT);
  return { train: toJsonl(train), eval: toJsonl(evalSet) };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const here = dirname(fileURLToPath(import.meta.url));
  const { train, eval: evalText } = makeInvoiceData();
  writeFileSync(join(here, 'train.jsonl'), train);
  writeFileSync(join(here, 'eval.jsonl'), evalText);
  console.log(`wrote ${TRAIN_COUNT} + ${EVAL_COUNT} invoices to ${here}`);
}
