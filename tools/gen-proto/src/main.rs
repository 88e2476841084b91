//! `whet-gen-proto SET.pb OUT_DIR`: compiles a FileDescriptorSet (made by protoc from
//! crates/server/proto/tinker_public.proto) into prost's Rust code in OUT_DIR.

use prost::Message;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, set, out] = args.as_slice() else {
        eprintln!("usage: whet-gen-proto SET.pb OUT_DIR");
        std::process::exit(2);
    };
    let bytes = std::fs::read(set).expect("read the descriptor set");
    let fds = prost_types::FileDescriptorSet::decode(bytes.as_slice()).expect("a descriptor set");
    prost_build::Config::new()
        .out_dir(out)
        // Byte fields as `Vec<u8>`: the server decodes them at once into typed vectors.
        .compile_fds(fds)
        .expect("prost-build compiles the schema");
}
