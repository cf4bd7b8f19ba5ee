"""The e2e-verification library: what the commands at the repository root build on.

Training (tasks, training, train_loop, pretrained, augment), scoring and metrics (scoring, streaming_metrics,
metrics, plots), back-ends (calibration, score_norm, plda, backends), inputs and outputs (speech_data,
frontend, image_input, embedding_files, checkpoints, onnx_graphs) and the search space (hp_space). The
card's shared modules (utils, losses, data_load, models/) stay at the root; nothing here imports a command.
"""
