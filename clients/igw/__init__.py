"""igw: generated gRPC stubs and a small typed agent client."""
