//! `pgws-load`: the load tool of the pgws stack (idle sockets, fan-out, ingest) and its peers.
//! Everything lives in the library; see `pgws_load::run`.

fn main() -> std::process::ExitCode {
    pgws_load::run()
}
