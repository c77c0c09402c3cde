import ArgumentParser
import Foundation
import NameBasedSockets
import NIOCore
import NIOPosix

/// Mobility for programs that will never link the library: each plain TCP connection is carried
/// over its own NBS session, so ssh, curl or a database client keeps its connection while the
/// mobile host changes address (Mosh does this for terminals only).
///
///   mobile side: app → 127.0.0.1:LOCAL → proxy → NBS session → proxy --serve → HOST:PORT
struct Proxy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Carry plain TCP connections over NBS sessions, so unmodified programs keep them across address changes.",
        discussion: """
            Mobile side: accept plain connections on --listen, open one session per connection to --to:
              nbs-mobility proxy --name laptop.example --listen 127.0.0.1:2222 --to server.example:7000
            Fixed side: accept sessions for --name on --port, forward each to --forward:
              nbs-mobility proxy --serve --name server.example --port 7000 --forward 127.0.0.1:22
            Then `ssh -p 2222 127.0.0.1` on the mobile side. An end of stream is passed on both ways
            (half-close), and each side's bytes wait while the other does not read (backpressure).
            The serving side also accepts plain TCP clients directly, as legacy sessions.
            """)

    @OptionGroup var common: CommonOptions
    @Flag(name: .long, help: "The fixed side: accept sessions and forward them to --forward.") var serve = false
    @Option(name: .long, help: "Mobile side: where plain clients connect, HOST:PORT (default host 127.0.0.1).") var listen: String?
    @Option(name: .long, help: "Mobile side: the serving proxy, PEER_NAME:PORT.") var to: String?
    @Option(name: .long, help: "Serving side: the TCP port to accept sessions on.") var port: Int?
    @Option(name: .long, help: "Serving side: where each session's bytes go, HOST:PORT.") var forward: String?
    @Option(name: .long, help: "Mobile side: nbs-only, fallback (plain TCP to a peer that does not speak NBS) or legacy-only.")
    var legacy: NBSOptions.LegacyFallback = .nbsOnly
    @Option(name: .long, help: "aggregate, handover or interactive.") var policy: MultipathPolicy = .aggregate

    func validate() throws {
        if serve {
            guard listen == nil, to == nil else { throw ValidationError("--serve forwards sessions: use --port and --forward, not --listen or --to") }
            guard let port, (1...65535).contains(port) else { throw ValidationError("--serve needs --port 1...65535") }
            guard let forward else { throw ValidationError("--serve needs --forward HOST:PORT (where the sessions' bytes go)") }
            _ = try hostPort(forward, option: "--forward")
        } else {
            guard port == nil, forward == nil else { throw ValidationError("--port and --forward are for --serve; the mobile side takes --listen and --to") }
            guard let listen, let to else { throw ValidationError("give --listen HOST:PORT and --to PEER_NAME:PORT (or --serve on the fixed side)") }
            _ = try hostPort(listen, option: "--listen", defaultHost: "127.0.0.1")
            _ = try hostPort(to, option: "--to")
        }
    }

    func run() async throws {
        var options = try common.options(policy: policy)
        options.legacyFallback = legacy
        if serve {
            try await runServing(options: options)
        } else {
            try await runMobile(options: options)
        }
    }

    // MARK: mobile side

    private func runMobile(options: NBSOptions) async throws {
        let (host, localPort) = try hostPort(listen!, option: "--listen", defaultHost: "127.0.0.1")
        let (peerName, peerPort) = try hostPort(to!, option: "--to")
        let server: NIOAsyncChannel<NIOAsyncChannel<ByteBuffer, ByteBuffer>, Never>
        do {
            server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .bind(host: host, port: localPort) { plainAsyncChannel($0) }
        } catch {
            throw CLIError("cannot listen on \(host):\(localPort): \(error)", hint: "is another program using the port? Pick another --listen port")
        }
        note("proxy: plain TCP on \(server.channel.localAddress.map(endpoint) ?? "\(host):\(localPort)") -> NBS session to \(peerName):\(peerPort) (as \(common.name))")
        let json = common.json
        let localName = common.name
        try await server.executeThenClose { inbound in
            try await withThrowingDiscardingTaskGroup { group in
                for try await connection in inbound {
                    group.addTask {
                        let client = connection.channel.remoteAddress.map(endpoint) ?? "?"
                        let session: Session
                        do {
                            session = try await NBS.open(localName: localName, peerName: peerName, port: peerPort, options: options)
                        } catch {
                            var log = ProxyLog(direction: "outgoing", client: client, peerName: peerName)
                            log.error = "\(error)"
                            log.emit(json: json, hint: openHint(error, peer: "\(peerName):\(peerPort)"))
                            try? await connection.channel.close()
                            return
                        }
                        var log = ProxyLog(direction: "outgoing", client: client, peerName: peerName)
                        await relay(connection, session, log: &log)
                        log.emit(json: json)
                    }
                }
            }
        }
    }

    // MARK: serving side

    private func runServing(options: NBSOptions) async throws {
        let (forwardHost, forwardPort) = try hostPort(forward!, option: "--forward")
        let listener: Listener
        do {
            listener = try await NBS.listen(localName: common.name, port: port!, options: options)
        } catch {
            throw CLIError("cannot listen on port \(port!): \(error)", hint: "is another process using the port?")
        }
        note("proxy: sessions for \(common.name) on port \(listener.port) -> plain TCP to \(forwardHost):\(forwardPort)")
        let json = common.json
        try await withThrowingDiscardingTaskGroup { group in
            while true {
                let session = try await listener.accept()
                group.addTask {
                    var log = ProxyLog(direction: "incoming", client: forwardHost + ":\(forwardPort)", peerName: session.peerName)
                    log.legacy = session.isLegacy
                    let target: NIOAsyncChannel<ByteBuffer, ByteBuffer>
                    do {
                        target = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                            .channelOption(.allowRemoteHalfClosure, value: true)
                            .connectTimeout(.seconds(10))
                            .connect(host: forwardHost, port: forwardPort) { plainAsyncChannel($0) }
                    } catch {
                        log.error = "cannot reach \(forwardHost):\(forwardPort): \(error)"
                        log.emit(json: json, hint: "is the service behind --forward running?")
                        await session.abort(reason: "the proxy cannot reach its target")
                        return
                    }
                    await relay(target, session, log: &log)
                    log.emit(json: json)
                }
            }
        }
    }
}

/// What to try when the session to the serving proxy cannot be opened.
private func openHint(_ error: any Error, peer: String) -> String? {
    guard let error = error as? NBSError else { return nil }
    switch error {
    case .legacyPeer:
        return "\(peer) is a plain TCP server, not `nbs-mobility proxy --serve`: point --to at the serving proxy, or reach it with --legacy fallback"
    case .connectFailed:
        return "is `nbs-mobility proxy --serve` running at \(peer), and is the port right?"
    default:
        return CLIError.from(error, peer: peer).hint
    }
}

/// A plain TCP channel for async reading. Writes and the output shutdown go to the channel itself
/// (see `relay`), not through the async writer.
private func plainAsyncChannel(_ channel: any Channel) -> EventLoopFuture<NIOAsyncChannel<ByteBuffer, ByteBuffer>> {
    channel.eventLoop.makeCompletedFuture {
        try channel.syncOptions?.setOption(.tcpOption(.tcp_nodelay), value: 1)
        return try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
    }
}

/// Copies both ways until both have ended: the plain side's end of stream finishes the session, the
/// peer's DATA_FIN shuts the plain side's output. A failure on either side aborts the session and
/// closes the plain connection, so neither copy waits forever.
func relay(_ plain: NIOAsyncChannel<ByteBuffer, ByteBuffer>, _ session: Session, log: inout ProxyLog) async {
    enum Copied: Sendable {
        case toPeer(Int)
        case fromPeer(Int)
    }
    let started = ContinuousClock.now
    do {
        try await plain.executeThenClose { inbound, _ in
            try await withThrowingTaskGroup(of: Copied.self) { group in
                group.addTask {
                    var count = 0
                    for try await chunk in inbound {
                        count += chunk.readableBytes
                        try await session.write(chunk)
                    }
                    await session.finish()
                    return .toPeer(count)
                }
                group.addTask {
                    // Each write is awaited until it reached the socket (backpressure), so the
                    // output shutdown below finds nothing queued: once the plain peer has ended its
                    // side, NIO turns the shutdown into a full close that would drop queued writes.
                    var count = 0
                    while let segments = try await session.readSegments(), let last = segments.last {
                        // As they arrived: one flush, and the last write's completion covers the others'.
                        for segment in segments.dropLast() { plain.channel.write(segment, promise: nil) }
                        count += segments.reduce(0) { $0 + $1.readableBytes }
                        try await plain.channel.writeAndFlush(last)
                    }
                    try? await plain.channel.close(mode: .output)
                    return .fromPeer(count)
                }
                do {
                    while let copied = try await group.next() {
                        switch copied {
                        case .toPeer(let n): log.bytesToPeer = n
                        case .fromPeer(let n): log.bytesFromPeer = n
                        }
                    }
                } catch {
                    await session.abort(reason: "\(error)")
                    plain.channel.close(promise: nil)
                    throw error
                }
            }
        }
        try await session.close()
    } catch {
        log.error = "\(error)"
        await session.abort(reason: "\(error)")
    }
    log.seconds = (ContinuousClock.now - started).seconds
    log.legacy = session.isLegacy
    log.subflows = await session.statistics.maxConcurrentSubflows
}

/// One line per proxied connection: JSON on stdout with --json, else a sentence on stderr.
struct ProxyLog {
    var direction: String
    var client: String
    var peerName: String
    var bytesToPeer = 0
    var bytesFromPeer = 0
    var seconds = 0.0
    var legacy = false
    var subflows = 0
    var error: String?

    init(direction: String, client: String, peerName: String) {
        self.direction = direction
        self.client = client
        self.peerName = peerName
    }

    func emit(json: Bool, hint: String? = nil) {
        if json {
            var object: [String: Any] = [
                "event": "proxied", "direction": direction, "plain_endpoint": client, "peer_name": peerName, "bytes_to_peer": bytesToPeer,
                "bytes_from_peer": bytesFromPeer, "seconds": (seconds * 1000).rounded() / 1000, "legacy": legacy, "subflows_max": subflows,
                "completed": error == nil,
            ]
            if let error { object["error"] = error }
            if let hint, error != nil { object["hint"] = hint }
            let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
            // Unbuffered: a long-running proxy's lines must not wait for its exit.
            FileHandle.standardOutput.write(data + Data("\n".utf8))
        } else {
            let what = error.map { "FAILED: \($0)\(hint.map { "\n  hint: \($0)" } ?? "")" } ?? "done"
            note("proxy: \(client) <-> \(peerName)\(legacy ? " (legacy)" : ""): \(bytesToPeer) bytes to the peer, \(bytesFromPeer) back, "
                + String(format: "%.3f s, ", seconds) + what)
        }
    }
}

private func note(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// "host:port", "[v6]:port", or ":port" / "port" with `defaultHost`.
func hostPort(_ text: String, option: String, defaultHost: String? = nil) throws -> (String, Int) {
    let colon = text.lastIndex(of: ":")
    let portText = colon.map { String(text[text.index(after: $0)...]) } ?? text
    var host = colon.map { String(text[..<$0]) } ?? ""
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    if host.isEmpty, let defaultHost { host = defaultHost }
    guard !host.isEmpty, let port = Int(portText), (1...65535).contains(port) else {
        throw ValidationError("\(option) must be HOST:PORT with a port in 1...65535, got '\(text)'")
    }
    return (host, port)
}

extension NBSOptions.LegacyFallback: ExpressibleByArgument {}
