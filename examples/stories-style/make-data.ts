// Generates the stories-style dataset: short TinyStories-like stories in a house style. Every story is
// a completion record: the prompt is its first sentence, the completion the rest, and the completion always
// ends with the same moral line on a line of its own. A base TinyStories model never writes that line; after
// fine-tuning it should (the `style` metric of `lowrank eval --marker`).
//
//   node --import tsx examples/stories-style/make-data.ts      (writes train.jsonl and eval.jsonl here)

import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { makeSplits, Picker, toJsonl } from '../rng.ts';

export const MORAL = 'And that is why we always share.';
export const SEED = 1234;
export const TRAIN_COUNT = 1500;
export const EVAL_COUNT = 100;

interface Hero {
  name: string;
  kind: 'girl' | 'boy';
}

const HEROES: Hero[] = [
  ...['Lily', 'Mia', 'Sue', 'Anna', 'Lucy', 'Amy', 'Kim', 'Jane', 'Emma', 'Zoe'].map((name) => ({
    name,
    kind: 'girl' as const,
  })),
  ...['Tom', 'Ben', 'Tim', 'Sam', 'Max', 'Jack', 'Leo', 'Bob', 'Joe', 'Dan'].map((name) => ({
    name,
    kind: 'boy' as const,
  })),
];

const THINGS: { name: string; adj: string[] }[] = [
  { name: 'ball', adj: ['big red', 'shiny blue', 'soft', 'bouncy'] },
  { name: 'kite', adj: ['yellow', 'pretty', 'long', 'colorful'] },
  { name: 'toy car', adj: ['fast', 'little red', 'shiny', 'green'] },
  { name: 'teddy bear', adj: ['soft brown', 'fluffy', 'old', 'big'] },
  { name: 'cookie', adj: ['big', 'warm', 'sweet', 'yummy'] },
  { name: 'apple', adj: ['red', 'big', 'juicy', 'green'] },
  { name: 'doll', adj: ['pretty', 'little', 'happy', 'pink'] },
  { name: 'book', adj: ['funny', 'big', 'new', 'old'] },
  { name: 'box of crayons', adj: ['new', 'big', 'bright'] },
  { name: 'boat', adj: ['little', 'blue', 'wooden'] },
  { name: 'sandwich', adj: ['big', 'tasty', 'yummy'] },
  { name: 'hat', adj: ['funny', 'red', 'warm'] },
];

const PLACES = ['park', 'garden', 'beach', 'forest', 'school', 'playground', 'lake', 'farm'];

const FRIENDS: { intro: string; short: string; them: string }[] = [
  ...['Ben', 'Tom', 'Max', 'Sam', 'Tim'].map((n) => ({ intro: `a boy named ${n}`, short: n, them: 'him' })),
  ...['Sue', 'Lily', 'Mia', 'Amy', 'Kim'].map((n) => ({ intro: `a girl named ${n}`, short: n, them: 'her' })),
  { intro: 'a little dog', short: 'the dog', them: 'it' },
  { intro: 'a small bird', short: 'the bird', them: 'it' },
  { intro: 'a little cat', short: 'the cat', them: 'it' },
  { intro: 'an old man', short: 'the old man', them: 'him' },
];

const PROBLEMS = ['who was sad', 'who was all alone', 'who was crying', 'who had no toys', 'who looked hungry'];

const cap = (s: string) => s[0]!.toUpperCase() + s.slice(1);

/** One story: {prompt: first sentence, completion: the rest, ending with the moral line}. */
export function makeStory(p: Picker): { prompt: string; completion: string } {
  const hero = p.pick(HEROES);
  const he = hero.kind === 'girl' ? 'she' : 'he';
  const his = hero.kind === 'girl' ? 'her' : 'his';
  const thing = p.pick(THINGS);
  const adj = p.pick(thing.adj);
  const place = p.pick(PLACES);
  let friend = p.pick(FRIENDS);
  while (friend.short === hero.name) friend = p.pick(FRIENDS);
  const problem = p.pick(PROBLEMS);
  const a = /^[aeiou]/.test(adj) ? 'an' : 'a';

  const opener = p.int(0, 3);
  const prompt = [
    `Once upon a time, there was a little ${hero.kind} named ${hero.name}.`,
    `Once upon a time, in a small town, there lived a ${hero.kind} named ${hero.name}.`,
    `One day, a little ${hero.kind} named ${hero.name} went to the ${place}.`,
    `${hero.name} was a happy little ${hero.kind} who loved to play.`,
  ][opener]!;

  const s: string[] = [];
  s.push(
    p.pick([
      `${cap(he)} had ${a} ${adj} ${thing.name}.`,
      `${cap(his)} mom gave ${hero.kind === 'girl' ? 'her' : 'him'} ${a} ${adj} ${thing.name}.`,
      `${hero.name} had ${a} ${adj} ${thing.name} that ${he} loved very much.`,
    ]),
  );
  if (p.chance(0.5)) s.push(p.pick([`${cap(he)} took it everywhere.`, `It was ${his} favorite thing.`]));
  s.push(
    opener === 2
      ? `At the ${place}, ${hero.name} saw ${friend.intro} ${problem}.`
      : `One day, ${hero.name} went to the ${place} and saw ${friend.intro} ${problem}.`,
  );
  s.push(
    p.pick([
      `${hero.name} wanted to keep the ${thing.name}, but then ${he} thought about ${friend.short}.`,
      `${hero.name} thought for a moment.`,
      `${hero.name} looked at ${his} ${thing.name} and then at ${friend.short}.`,
    ]),
  );
  s.push(
    p.pick([
      `${cap(he)} gave the ${thing.name} to ${friend.short}.`,
      `${cap(he)} said, "You can have my ${thing.name} too!"`,
      `${cap(he)} shared the ${thing.name} with ${friend.short}.`,
    ]),
  );
  s.push(
    p.pick([
      `${cap(friend.short)} smiled and was happy again.`,
      `They played together all day and had lots of fun.`,
      `${cap(friend.short)} was not sad anymore.`,
    ]),
  );
  if (p.chance(0.5)) s.push(p.pick([`${hero.name} felt warm and happy inside.`, `Now they were best friends.`]));
  return { prompt, completion: ` ${s.join(' ')}\n${MORAL}` };
}

export function makeStoriesData(seed = SEED): { train: string; eval: string } {
  const p = new Picker(seed);
  const { train, eval: evalSet } = makeSplits(p, makeStory, TRAIN_COUNT, EVAL_COUNT);
  return { train: toJsonl(train), eval: toJsonl(evalSet) };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const here = dirname(fileURLToPath(import.meta.url));
  const { train, eval: evalText } = makeStoriesData();
  writeFileSync(join(here, 'train.jsonl'), train);
  writeFileSync(join(here, 'eval.jsonl'), evalText);
  console.log(`wrote ${TRAIN_COUNT} + ${EVAL_COUNT} stories to ${here}`);
}
