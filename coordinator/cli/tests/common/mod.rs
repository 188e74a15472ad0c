//! Running the `trustql` binary from tests.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `trustql` with `args` and waits for it.
pub(crate) fn trustql(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trustql"))
        .args(args)
        .output()
        .expect("run trustql")
}

/// Its stdout and stderr together, for messages and assertions.
pub(crate) fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A `trustql demo … --serve --info FILE` running in the background.
pub(crate) struct ServedDemo {
    /// The demo process (killed on drop).
    pub child: std::process::Child,
    /// The info file's JSON.
    pub info: serde_json::Value,
    /// The info file.
    pub info_path: std::path::PathBuf,
    /// Lines of its stdout, as they come.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ServedDemo {
    /// `trustql query` against this demo with its own token; `args` end with the SQL.
    pub(crate) fn query(&self, args: &[&str]) -> Output {
        let token = self.info["token"].as_str().expect("token");
        self.query_as(token, args)
    }

    /// `trustql query` against this demo with `token`; `args` end with the SQL.
    pub(crate) fn query_as(&self, token: &str, args: &[&str]) -> Output {
        let (url, ca) = (
            self.info["url"].as_str().expect("url"),
            self.info["ca"].as_str().expect("ca"),
        );
        let mut all = vec!["query", "--coordinator", url, "--ca", ca, "--token", token];
        all.extend_from_slice(args);
        trustql(&all)
    }
}

impl Drop for ServedDemo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `trustql demo ARGS --serve --info DIR/info.json` and waits for the info file.
pub(crate) fn serve_demo(dir: &std::path::Path, args: &[&str]) -> ServedDemo {
    use std::io::BufRead;
    let info_path = dir.join("info.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustql"))
        .arg("demo")
        .args(args)
        .args(["--serve", "--info"])
        .arg(&info_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn demo");
    // Drain its output so it never blocks on a full pipe, passing the lines on.
    let stdout = child.stdout.take().expect("stdout");
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = send.send(line);
        }
    });
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(120) {
        if let Ok(text) = std::fs::read_to_string(&info_path)
            && let Ok(info) = serde_json::from_str(&text)
        {
            return ServedDemo {
                child,
                info,
                info_path,
                lines,
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the demo never wrote {}", info_path.display());
}
