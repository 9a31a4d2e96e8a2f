// LoRA / DoRA with Hugging Face PEFT parity: the public surface of src/peft/lora.

export {
  type AddWeightedAdapterOptions,
  addWeightedAdapter,
  COMBINATION_TYPES,
  type CombinationType,
  calculateMajoritySignMask,
  disjointMerge,
  type LoraFactors,
  type MajoritySignMethod,
  magnitudeBasedPruning,
  mergeTaskTensors,
  prune,
  quantile,
  randomPruning,
  svdOfProduct,
  svdToFactors,
  symmetricEigen,
  type TaskMerge,
  type TaskMergeOptions,
  taskArithmetic,
  topSvd,
  type WeightedAdapterResult,
} from './combine.ts';
export {
  ADAPTER_CONFIG_KEYS,
  adapterConfigToJson,
  type InitLoraWeights,
  type LoraBias,
  type LoraConfig,
  type LoraConfigInput,
  loraConfig,
  loraScaling,
  type ParsedAdapterConfig,
  parseAdapterConfig,
  TASK_TYPES,
  type TaskType,
} from './config.ts';
export { initEmbedding, initLinear } from './init.ts';
export {
  ADAPTER_CONFIG_NAME,
  ADAPTER_WEIGHTS_NAME,
  adapterStateDict,
  type LoadAdapterOptions,
  loadAdapter,
  readAdapterConfig,
  removeAdapterName,
  type SaveAdapterOptions,
  saveAdapter,
} from './io.ts';
export {
  AdapterRuntime,
  BASE_ROW,
  cloneModule,
  type LayerAdapter,
  LoraEmbedding,
  LoraLinear,
  MergeError,
  ModulesToSaveWrapper,
  type RowGroups,
} from './layer.ts';
export { adapterLayout, type BaseWeightsPolicy } from './layout.ts';
export {
  type GgufExportOptions,
  type GgufFloatType,
  ggufHparams,
  ggufTensors,
  ggufTokenizerFromHF,
  saveMergedGguf,
  saveMergedHF,
} from './merge.ts';
export type { AdapterPlan, PlannedLayer } from './model.ts';
export { type AdapterLayer, type AddAdapterOptions, LoraModel, type LoraModelOptions } from './model.ts';
export {
  addRowsAt,
  doraLinear,
  doraWeightNorm,
  loraLinear,
  loraMixedRows,
  type RowGroup,
} from './ops.ts';
export {
  ALL_LINEAR,
  checkTargetModuleExists,
  DEFAULT_TARGET_MODULES,
  findMinimalTargetModules,
  getPatternKey,
  rankAndAlpha,
  resolveTargetModules,
} from './target.ts';
export {
  type AdapterWeights,
  adapterWeightsBytes,
  addAdapterFromWeights,
  checkAdapterWeights,
  disposeAdapterWeights,
  readAdapterWeights,
} from './weights.ts';
