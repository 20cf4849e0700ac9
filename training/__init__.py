"""Built-in data, the data pipeline, and the training of the image tokenizer and of the decoder.
It may import model, tokenizer, sampling (for the sample sheets shown while training) and the shared modules.
"""
