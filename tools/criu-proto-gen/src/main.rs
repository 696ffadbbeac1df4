//! `criu-proto-gen PROTO_DIR OUT_DIR`: compiles every `.proto` file in PROTO_DIR with
//! prost-build (protoc must be on PATH) into OUT_DIR.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [protos, out] = args.as_slice() else {
        eprintln!("usage: criu-proto-gen PROTO_DIR OUT_DIR");
        std::process::exit(2);
    };
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(protos)
        .expect("reading the proto directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    prost_build::Config::new()
        .out_dir(out)
        .compile_protos(&files, &[protos])
        .expect("compiling CRIU's proto files");
}
