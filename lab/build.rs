//! Generates the tonic client/server glue for `streamlb.lab.v1.Telemetry` without protoc:
//! the messages are hand-written prost structs in `src/proto.rs` (mirroring proto/telemetry.proto).

fn main() {
    let method = |name: &str, route: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::proto::Reading")
            .output_type(output)
            .codec_path("tonic_prost::ProstCodec")
            .client_streaming()
    };
    let service = tonic_build::manual::Service::builder()
        .name("Telemetry")
        .package("streamlb.lab.v1")
        .method(
            // Unary: one Reading, one Ack (the cost bench's calls).
            tonic_build::manual::Method::builder()
                .name("send")
                .route_name("Send")
                .input_type("crate::proto::Reading")
                .output_type("crate::proto::Ack")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .method(method("upload", "Upload", "crate::proto::UploadSummary").build())
        .method(
            method("stream", "Stream", "crate::proto::Ack")
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
