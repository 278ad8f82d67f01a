"""askmesh: retrieval-augmented question answering as gRPC microservices."""
