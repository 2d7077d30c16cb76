"""Domain-labelled data: preprocessing into Megatron's indexed dataset and labelled samples."""
