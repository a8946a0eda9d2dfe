"""The data-prep service: corpus in, versioned tokenized dataset out."""
