"""Generated gRPC code for the askmesh.v1 proto package (see `make protos`)."""
