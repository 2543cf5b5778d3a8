"""A gRPC client that knows nothing of teaserve: grpcio-reflection (v1alpha, all it has)
discovers a server's services and message types, and the calls are made from the
descriptors it fetched. Used by tests/tests/reflection.rs against both services.

Usage: reflection_client.py ADDRESS SERVICE METHOD REQUEST_JSON
Prints one JSON object: {"services": [...], "response": {...}} (a stream's last message).
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> None:
    address, service_name, method_name, request_json = sys.argv[1:5]
    channel = grpc.insecure_channel(address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(service_name)
    method = service.methods_by_name[method_name]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(request_json, request_class())
    path = f"/{service.full_name}/{method.name}"
    serialize = request_class.SerializeToString
    deserialize = response_class.FromString
    if method.server_streaming:
        call = channel.unary_stream(path, serialize, deserialize)
        response = None
        for response in call(request, timeout=300):
            pass
    else:
        call = channel.unary_unary(path, serialize, deserialize)
        response = call(request, timeout=60)
    out = {
        "services": services,
        "response": json_format.MessageToDict(response) if response is not None else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
