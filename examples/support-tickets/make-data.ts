// Generates the support-tickets dataset: customer messages to classify into one of six categories. Chat
// records: a system message with the instructions, the ticket as the user message, the category label as the
// assistant message (the only trained turn). Evaluated by label accuracy (`lowrank eval --metric accuracy`,
// or 'auto': every reference is a one-word label).
//
//   node --import tsx examples/support-tickets/make-data.ts      (writes train.jsonl and eval.jsonl here)

import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { makeSplits, Picker, toJsonl } from '../rng.ts';

export const SEED = 2024;
export const TRAIN_COUNT = 1200;
export const EVAL_COUNT = 100;
export const CATEGORIES = ['billing', 'technical', 'account', 'shipping', 'refund', 'feedback'] as const;
export type Category = (typeof CATEGORIES)[number];

export const SYSTEM_PROMPT =
  'You triage customer support tickets. Reply with exactly one category: billing, technical, account, shipping, refund or feedback.';

const PRODUCTS = [
  'the Aero 2 headphones',
  'my Nimbus router',
  'the Pixel Pro tablet',
  'the SmartHome hub',
  'the Trailblazer backpack',
  'my Volt e-bike',
  'the Orbit smartwatch',
  'the Lumen desk lamp',
  'the Zen coffee maker',
  'the Atlas keyboard',
];

const GREETINGS = ['Hi,', 'Hello,', 'Hi there,', 'Good morning,', 'Hey,', 'Dear support team,', ''];
const SIGNOFFS = ['Thanks.', 'Thank you!', 'Regards, Sam', 'Best, Maria', 'Cheers', 'Please help.', '', 'Kind regards'];

type Slots = { product: string; order: string; amount: string; days: number; month: string; email: string };

const TEMPLATES: Record<Category, ((s: Slots) => string)[]> = {
  billing: [
    (s) => `I was charged ${s.amount} twice this month for my subscription. Can you check my invoice?`,
    (s) => `My credit card was billed ${s.amount} but my plan should cost less. Why is the charge so high?`,
    (s) => `The invoice for ${s.month} shows a fee I don't recognise. What is this charge for?`,
    () => `I need to update the card you bill every month, the old one expired.`,
    () => `Can I switch from monthly to yearly payment to save money?`,
    (s) => `I got a payment failed email for order ${s.order} but the money left my account.`,
    () => `Please send me a VAT invoice, I need it for my company's accounting.`,
  ],
  technical: [
    (s) => `${s.product} keeps disconnecting from wifi every few minutes. I already restarted it.`,
    () => `The app crashes as soon as I open it after the latest update.`,
    (s) => `${s.product} won't turn on anymore, the light just blinks red.`,
    (s) => `Bluetooth pairing with ${s.product} fails with error code E42.`,
    () => `The firmware update got stuck at 80% and now the device is unresponsive.`,
    (s) => `Battery on ${s.product} drains in two hours, it used to last all day.`,
    () => `I can't sync my data between the phone app and the website, it shows an error.`,
  ],
  account: [
    () => `I forgot my password and the reset email never arrives.`,
    (s) => `Please change the email on my account to ${s.email}.`,
    () => `I want to delete my account and all my personal data.`,
    () => `My account is locked after too many login attempts. How do I unlock it?`,
    () => `How do I turn on two-factor authentication for my profile?`,
    () => `Someone else logged into my account, I think it was hacked.`,
    () => `I can't log in, it says my username does not exist.`,
  ],
  shipping: [
    (s) => `Where is my order ${s.order}? It was supposed to arrive ${s.days} days ago.`,
    (s) => `The tracking number for ${s.order} has not updated in a week.`,
    () => `Can you ship to Canada? I don't see it in the country list.`,
    (s) => `My package for order ${s.order} was delivered to the wrong address.`,
    () => `How long does express delivery take to Berlin?`,
    (s) => `The courier left ${s.product} outside in the rain, the box was soaked.`,
    (s) => `I need to change the delivery address on order ${s.order} before it ships.`,
  ],
  refund: [
    (s) => `I returned ${s.product} ${s.days} days ago and still have not got my money back.`,
    (s) => `I want a refund for order ${s.order}, the item is not what I expected.`,
    (s) => `${s.product} arrived broken. I'd like my ${s.amount} back, not a replacement.`,
    () => `How long does a refund take to reach my bank account?`,
    (s) => `I cancelled order ${s.order} within the trial period, please refund me.`,
    () => `Can I get my money back for the subscription I forgot to cancel?`,
  ],
  feedback: [
    (s) => `Just wanted to say ${s.product} is amazing, best purchase this year!`,
    () => `Your support agent Lisa was very helpful yesterday, thank you.`,
    () => `It would be great if the app had a dark mode.`,
    (s) => `Suggestion: ${s.product} should come with a longer cable.`,
    () => `I love the new design of your website, much easier to use.`,
    () => `The packaging uses too much plastic, please consider recycling materials.`,
  ],
};

const MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October'];
const USERS = ['anna.k', 'jmiller', 'li.wei', 'pat_smith', 'omar.h', 'sofia88'];

export function makeTicket(p: Picker): { messages: { role: string; content: string }[] } {
  const label = p.pick(CATEGORIES);
  const slots: Slots = {
    product: p.pick(PRODUCTS),
    order: `#${p.int(10000, 99999)}`,
    amount: `$${p.int(5, 300)}.${String(p.int(0, 99)).padStart(2, '0')}`,
    days: p.int(2, 21),
    month: p.pick(MONTHS),
    email: `${p.pick(USERS)}@example.com`,
  };
  let body = p.pick(TEMPLATES[label])(slots);
  if (p.chance(0.3)) body = body[0]!.toLowerCase() + body.slice(1); // some people type quickly
  const ticket = [p.pick(GREETINGS), body, p.pick(SIGNOFFS)].filter(Boolean).join(p.chance(0.5) ? ' ' : '\n');
  return {
    messages: [
      { role: 'system', content: SYSTEM_PROMPT },
      { role: 'user', content: ticket },
      { role: 'assistant', content: label },
    ],
  };
}

export function makeTicketsData(seed = SEED): { train: string; eval: string } {
  const p = new Picker(seed);
  const { train, eval: evalSet } = makeSplits(p, makeTicket, TRAIN_COUNT, EVAL_COUNT);
  return { train: toJsonl(train), eval: toJsonl(evalSet) };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const here = dirname(fileURLToPath(import.meta.url));
  const { train, eval: evalText } = makeTicketsData();
  writeFileSync(join(here, 'train.jsonl'), train);
  writeFileSync(join(here, 'eval.jsonl'), evalText);
  console.log(`wrote ${TRAIN_COUNT} + ${EVAL_COUNT} tickets to ${here}`);
}
