//! `citystream serve` with a real Flight SQL client (ADBC's driver from PyPI, as a notebook
//! uses it): the README's analyst queries give the rows `citystream sql` gives, a prepared
//! statement binds parameters, a BI tool's catalog calls see every table, a wrong token is
//! refused, a result over the row limit is cut with a clear error, and a query over the
//! memory limit is refused while the server goes on.

mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use common::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The ```sql blocks of the README's "Queries for analysts".
fn readme_queries() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = text.find("## Queries for analysts").unwrap();
    let section = &text[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    section.split("```sql\n").skip(1).map(|b| b[..b.find("```").unwrap()].trim().to_owned()).collect()
}

/// Rows as sorted text lines.
fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let opts = FormatOptions::default().with_null("∅");
    let mut out = Vec::new();
    for b in batches {
        let fmts: Vec<ArrayFormatter> =
            b.columns().iter().map(|a| ArrayFormatter::try_new(a.as_ref(), &opts).unwrap()).collect();
        for r in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join(" | "));
        }
    }
    out.sort();
    out
}

fn read_ipc(path: &Path) -> Vec<RecordBatch> {
    let r = arrow::ipc::reader::FileReader::try_new(std::fs::File::open(path).unwrap(), None).unwrap();
    r.map(Result::unwrap).collect()
}

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_runs_the_readme_queries_with_the_rows_citystream_sql_gives() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // ten simulated hours of the embedded default, from its start (the README's queries ask
    // for 2026-03-02 08:00)
    let text =
        std::fs::read_to_string(root().join("deploy/local.yaml")).unwrap().replace("duration: 1d ", "duration: 10h ");
    let yaml = local_yaml_in(&text, &data, None);
    run_in_process(&yaml).await;
    let lake = data.join("lake");
    let tokens = data.join("secrets/control_tokens");
    let viewer = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("viewer ").map(|r| r.split_whitespace().last().unwrap().to_owned()))
        .expect("the control center wrote a viewer token");

    let (server, uri) = serve(&lake, &tokens, &[]);

    let queries = readme_queries();
    assert!(queries.len() >= 5, "the README's analyst queries: {queries:?}");
    let with_param = (
        "SELECT segment_id, count(*) AS windows FROM traffic_windows WHERE segment_id = $1 GROUP BY segment_id",
        "seg-00-03",
    );
    let plan = serde_json::json!({
        "queries": queries,
        "params": [[with_param.0, [with_param.1]]],
        "bad_token": "not-a-token-of-this-server",
        "over_limit": "SELECT * FROM traffic",
    });
    let out = dir.path().join("client");
    std::fs::create_dir_all(&out).unwrap();
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).unwrap();
    client(&uri, &viewer, &plan_path, &out);
    // and one query through the Flight SQL JDBC driver (DBeaver and other JDBC tools)
    let by_class = queries.iter().find(|q| q.contains("object_class")).expect("the README's objects-by-class query");
    let jdbc_rows = jdbc(uri.trim_start_matches("grpc://"), &viewer, by_class);
    drop(server);

    let mut expected_sql: Vec<String> = queries.clone();
    expected_sql.push(with_param.0.replace("$1", &format!("'{}'", with_param.1)));
    for (n, sql) in expected_sql.iter().enumerate() {
        let want = citystream_pipeline::sql::query(&lake, sql).await.unwrap();
        let got = read_ipc(&out.join(format!("{n}.arrow")));
        assert_eq!(rows(&got), rows(&want), "query {n}: {sql}");
        assert!(!rows(&want).is_empty(), "query {n} returns rows: {sql}");
    }
    let mut want_jdbc = rows(&citystream_pipeline::sql::query(&lake, by_class).await.unwrap());
    want_jdbc.sort();
    assert_eq!(jdbc_rows, want_jdbc, "the JDBC driver gets the rows of citystream sql");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    eprintln!("{report:#}");
    let over = report["over_limit"].as_str().unwrap();
    assert!(over.contains("limit of 1000 rows"), "over the row limit: {over}");
    let bad = report["bad_token"].as_str().unwrap();
    assert!(bad.to_lowercase().contains("unauthenticated"), "a wrong token: {bad}");
    let (_, names) = citystream_pipeline::sql::context(&lake).await.unwrap();
    let tables: Vec<String> =
        report["tables"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    assert_eq!(tables, names, "catalog calls list every table");
    assert_eq!(report["catalogs"], serde_json::json!(["datafusion"]));
    assert!(report["traffic_windows_columns"].as_array().unwrap().iter().any(|c| c == "p85_speed_kmh"));
    assert!(report["explain"].to_string().contains("plan"), "EXPLAIN: {}", report["explain"]);

    // over TLS, with a certificate of its own
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl made a certificate");
    let tls_args = ["--tls-cert".as_ref(), cert.as_os_str(), "--tls-key".as_ref(), key.as_os_str()];
    let (server, uri) = serve(&lake, &tokens, &tls_args);
    assert!(uri.starts_with("grpc+tls://"), "{uri}");
    let tls_out = dir.path().join("tls");
    std::fs::create_dir_all(&tls_out).unwrap();
    let tls_plan = dir.path().join("tls.json");
    std::fs::write(&tls_plan, serde_json::json!({"queries": [&queries[0]], "tls_root": cert}).to_string()).unwrap();
    client(&uri, &viewer, &tls_plan, &tls_out);
    drop(server);
    let want = citystream_pipeline::sql::query(&lake, &queries[0]).await.unwrap();
    assert_eq!(rows(&read_ipc(&tls_out.join("0.arrow"))), rows(&want), "the same rows over TLS");

    // a query over the memory limit is refused with a clear error; the server goes on
    let (server, uri) = serve(&lake, &tokens, &["--max-memory-mb".as_ref(), "1".as_ref()]);
    let mem_out = dir.path().join("memory");
    std::fs::create_dir_all(&mem_out).unwrap();
    let mem_plan = dir.path().join("memory.json");
    let light = "SELECT count(*) AS n FROM traffic";
    let heavy = "SELECT event_id, count(*) AS n FROM traffic GROUP BY event_id ORDER BY n DESC LIMIT 5";
    std::fs::write(&mem_plan, serde_json::json!({"heavy": heavy, "light": light}).to_string()).unwrap();
    client(&uri, &viewer, &mem_plan, &mem_out);
    // a table that appears while the server runs is served without a restart
    let copy = lake.join("copied_windows");
    let status = Command::new("cp").arg("-r").arg(lake.join("traffic_windows")).arg(&copy).status().unwrap();
    assert!(status.success(), "copied a table");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let new_out = dir.path().join("new_table");
    std::fs::create_dir_all(&new_out).unwrap();
    let new_plan = dir.path().join("new_table.json");
    let count = "SELECT count(*) AS n FROM copied_windows";
    std::fs::write(&new_plan, serde_json::json!({"queries": [count], "queries_only": true}).to_string()).unwrap();
    client(&uri, &viewer, &new_plan, &new_out);
    drop(server);
    let want = citystream_pipeline::sql::query(&lake, "SELECT count(*) AS n FROM traffic_windows").await.unwrap();
    assert_eq!(rows(&read_ipc(&new_out.join("0.arrow"))), rows(&want), "the new table, without a restart");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mem_out.join("report.json")).unwrap()).unwrap();
    let refused = report["heavy"].as_str().unwrap();
    assert!(refused.contains("limit of 1 MiB"), "over the memory limit: {refused}");
    let want = citystream_pipeline::sql::query(&lake, light).await.unwrap();
    assert_eq!(rows(&read_ipc(&mem_out.join("0.arrow"))), rows(&want), "the next query is answered");
}

/// Starts `citystream serve` on a free port; the server (killed when dropped) and its URI.
fn serve(lake: &Path, tokens: &Path, extra: &[&std::ffi::OsStr]) -> (Server, String) {
    let mut child = Command::new(citystream_bin())
        .args(["serve", "--addr", "127.0.0.1:0", "--max-rows", "1000", "--data"])
        .arg(lake)
        .arg("--tokens-file")
        .arg(tokens)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let server = Server(child);
    let uri = first.split_whitespace().find(|w| w.starts_with("grpc")).unwrap_or_else(|| panic!("{first}")).to_owned();
    (server, uri)
}

/// Runs `sql` through the Flight SQL JDBC driver (`CITYSTREAM_FLIGHT_JDBC_JAR`, which
/// scripts/test.sh fetches with scripts/setup-jdbc.sh); its rows, sorted.
fn jdbc(host_port: &str, token: &str, sql: &str) -> Vec<String> {
    let jar = std::env::var("CITYSTREAM_FLIGHT_JDBC_JAR").unwrap_or_else(|_| {
        let out = Command::new(root().join("scripts/setup-jdbc.sh")).output().expect("scripts/setup-jdbc.sh");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    });
    let out = Command::new("java")
        .arg("--add-opens=java.base/java.nio=ALL-UNNAMED")
        .args(["-cp", &jar])
        .arg(root().join("tests/jdbc/FlightJdbc.java"))
        .args([host_port, token, sql])
        .output()
        .expect("java (scripts/test.sh installs a JDK)");
    assert!(out.status.success(), "the JDBC client failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Runs the ADBC client with `plan`.
fn client(uri: &str, token: &str, plan: &Path, out: &Path) {
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/python/flight_client.py"))
        .args([uri, token])
        .arg(plan)
        .arg(out)
        .status()
        .expect("the ADBC client (scripts/setup-python.sh installs it)");
    assert!(status.success(), "the ADBC client failed");
}
