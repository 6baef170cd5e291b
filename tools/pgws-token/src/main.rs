//! `pgws-token`: prints a token for a pgws stack. See the library for the options.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(pgws_token::run(&args, std::env::vars()));
}
