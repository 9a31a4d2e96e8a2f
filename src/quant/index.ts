// bitsandbytes-compatible quantization: NF4/FP4 blockwise 4-bit with double quantization, LLM.int8()
// row-wise weights, the code books, and the transformers bnb-4bit on-disk format.

export * from './blockwise4.ts';
export * from './blockwise8.ts';
export * from './bnb-serialize.ts';
export * from './codebooks.ts';
export * from './int8.ts';
export * from './linear4bit.ts';
export * from './load.ts';
export * from './merge.ts';
export * from './pyjson.ts';
export * from './save.ts';
