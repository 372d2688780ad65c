//! Compiles vigil.v1 with protox (pure Rust), so no protoc is needed. Without the `grpc`
//! feature only the messages are generated (vigil-core's build).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vigil/v1/agent.proto", "proto/vigil/v1/control.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        // `AgentService.Connect` would clash with the generated
        // `AgentServiceClient::connect(url)`; callers build a Channel instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
