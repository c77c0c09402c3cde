// Loopback benchmarks: one NBS subflow against plain TCP, and session set-up against TCP connect,
// in the same process and the same run. Prints a table and one JSON line per case.
//
// Plain TCP and NBS alternate for --rounds rounds and the medians are compared, because this
// machine's loopback rate varies by 2x from one second to the next. --rounds 0: set-up only.
// Set-up across a real path: netns-scripts/bench.sh runs --serve-opens and --connect-opens in two
// namespaces. `nbs-bench --help` lists the options.

import ArgumentParser
import Crypto
import Foundation
import Logging
import NameBasedSockets
import NBSProtocol
import NIOCore
import NIOPosix

struct BenchArguments: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nbs-bench",
        abstract: "NBS against plain TCP (SwiftNIO both): loopback goodput and CPU per GiB, and set-up latency.",
        discussion: """
            Without --serve-opens or --connect-opens: --rounds rounds of --bytes on loopback, alternating: over \
            plain TCP, over one NBS subflow with the application's tasks on Swift's thread pool, and the same \
            with them on the session's event loop (Session.taskExecutor, as TCP's handlers run on theirs); \
            then --opens session set-ups against TCP connects. \
            --connect-opens prints one JSON line: the medians of TCP connect, the TCP round trip, resolving \
            --name (by the system resolver, as NBS.open does) and NBS open to the server's first byte.
            The library logs to stderr at NBS_LOG_LEVEL (default warning: every timed session is aborted, \
            which its listener would report at info).
            """)

    @Option(help: "Bytes per goodput round.")
    var bytes = 4 << 30
    @Option(help: "Session set-ups (and TCP connects) to time, 1...100000.")
    var opens = 200
    @Option(help: "Goodput rounds of each of NBS and plain TCP, 0...100 (0: set-up only).")
    var rounds = 3
    @Flag(help: """
        Make NIO's event loops Swift concurrency's global executor (an application's choice), so that \
        tasks resume on the loops instead of hopping between them and Swift's own thread pool.
        """)
    var loopExecutor = false

    @Option(name: .customLong("serve-opens"), help: ArgumentHelp("Serve --opens sessions on PORT (NBS) and a TCP echo on PORT+1, then exit.", valueName: "PORT"))
    var servePort: Int?
    @Option(name: .customLong("connect-opens"), help: ArgumentHelp("Time set-ups to a --serve-opens at ADDR (needs --port and --name).", valueName: "ADDR"))
    var connectAddress: String?
    @Option(help: "The --serve-opens port to connect to.")
    var port: Int?
    @Option(help: "The server's name (--serve-opens: its local name, default bench.server).")
    var name: String?
    @Option(help: ArgumentHelp("With --connect-opens: open subflows from this address only.", valueName: "ADDR"))
    var local: String?
    @Option(name: .customLong("where"), help: "With --connect-opens: the label of the JSON line.")
    var place = "netns"
    @Flag(help: "With --connect-opens: the opener proves an identity key, so it is not admitted at OPEN (for comparison).")
    var proveIdentity = false

    func validate() throws {
        guard bytes > 0 else { throw ValidationError("--bytes must be positive") }
        guard (1...100_000).contains(opens) else { throw ValidationError("--opens must be within 1...100000") }
        guard (0...100).contains(rounds) else { throw ValidationError("--rounds must be within 0...100") }
        for (flag, value) in [("--serve-opens", servePort), ("--port", port)] {
            if let value, !(1...65_535).contains(value) { throw ValidationError("\(flag) must be a port, 1...65535") }
        }
        if let servePort, servePort == 65_535 { throw ValidationError("--serve-opens also needs PORT+1 for its TCP echo") }
        guard servePort == nil || connectAddress == nil else { throw ValidationError("give --serve-opens or --connect-opens, not both") }
        if connectAddress != nil, port == nil || name == nil { throw ValidationError("--connect-opens needs --port PORT and --name NAME") }
        if let connectAddress, (try? SocketAddress(ipAddress: connectAddress, port: 0)) == nil {
            throw ValidationError("--connect-opens: not an IP address: \(connectAddress)")
        }
        if let local, (try? SocketAddress(ipAddress: local, port: 0)) == nil { throw ValidationError("--local: not an IP address: \(local)") }
    }
}

let arguments = BenchArguments.parseOrExit()
let logLevel = ProcessInfo.processInfo.environment["NBS_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .warning
LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    handler.logLevel = logLevel
    return handler
}
// Before any task is enqueued: the executor cannot be changed once Swift's pool has work.
if arguments.loopExecutor { NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor() }
let totalBytes = arguments.bytes
let opens = arguments.opens
let rounds = arguments.rounds
let chunkSize = 1 << 20
let chunk = ByteBuffer(repeating: 0x5A, count: chunkSize)
let group = MultiThreadedEventLoopGroup.singleton

func cpuSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

struct Measurement {
    let name: String
    let bytes: Int
    let seconds: Double
    let cpu: Double
    var gbps: Double { Double(bytes) * 8 / seconds / 1e9 }
    var cpuPerGiB: Double { cpu / (Double(bytes) / Double(1 << 30)) }
}

// MARK: plain TCP with SwiftNIO

final class CountingSink: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let target: Int
    let done: EventLoopPromise<Void>
    var received = 0
    init(target: Int, done: EventLoopPromise<Void>) {
        self.target = target
        self.done = done
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        received += Self.unwrapInboundIn(data).readableBytes
        if received >= target { done.succeed(()) }
    }
}

final class BulkWriter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let target: Int
    var sent = 0
    init(target: Int) { self.target = target }
    func channelActive(context: ChannelHandlerContext) { pump(context) }
    func channelWritabilityChanged(context: ChannelHandlerContext) { pump(context) }
    private func pump(_ context: ChannelHandlerContext) {
        while context.channel.isWritable, sent < target {
            context.write(Self.wrapOutboundOut(chunk), promise: nil)
            sent += chunkSize
        }
        context.flush()
    }
}

func plainTCP(bytes: Int) async throws -> Measurement {
    let done = group.next().makePromise(of: Void.self)
    let server = try await ServerBootstrap(group: group)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(CountingSink(target: bytes, done: done)) }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    let cpu0 = cpuSeconds()
    let start = ContinuousClock.now
    let client = try await ClientBootstrap(group: group)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(BulkWriter(target: bytes)) }
        }
        .connect(to: server.localAddress!).get()
    try await done.futureResult.get()
    let seconds = (ContinuousClock.now - start).asSeconds
    let cpu = cpuSeconds() - cpu0
    try await client.close()
    try await server.close()
    return Measurement(name: "plain TCP (SwiftNIO)", bytes: bytes, seconds: seconds, cpu: cpu)
}

// MARK: NBS, one subflow

/// As CountingSink takes NIO's reads: the buffers as they came, uncopied.
func receiveAll(_ session: Session) async throws -> Int {
    var received = 0
    while let segments = try await session.readSegments(maxBytes: 4 << 20) { received += segments.reduce(0) { $0 + $1.readableBytes } }
    try await session.close()
    return received
}

func send(_ bytes: Int, on session: Session) async throws -> Int {
    var sent = 0
    while sent < bytes {
        try await session.write(chunk)
        sent += chunkSize
    }
    await session.finish()
    return sent
}

/// `body` on `session`'s event loop (`Session.taskExecutor`) when `onLoop`, as the plain-TCP side's
/// handlers run on theirs; otherwise on Swift's thread pool, as an application's tasks run by default:
/// one hand-off to the loop and back per call.
func running<T: Sendable>(onLoopOf session: Session, _ onLoop: Bool, _ body: () async throws -> T) async throws -> T {
    onLoop ? try await withTaskExecutorPreference(session.taskExecutor, operation: body) : try await body()
}

func nbsSession(bytes: Int, onLoop: Bool) async throws -> Measurement {
    var options = NBSOptions()
    options.localAddresses = [try SocketAddress(ipAddress: "127.0.0.1", port: 0)]
    options.resolver = StaticResolver(["bench.server": ["127.0.0.1"]])
    let listener = try await NBS.listen(localName: "bench.server", port: 0, options: options)
    let receiver = Task {
        let session = try await listener.accept()
        return try await running(onLoopOf: session, onLoop) { try await receiveAll(session) }
    }
    let cpu0 = cpuSeconds()
    let start = ContinuousClock.now
    let session = try await NBS.open(localName: "bench.client", peerName: "bench.server", port: listener.port, options: options)
    let sent = try await running(onLoopOf: session, onLoop) { try await send(bytes, on: session) }
    let received = try await receiver.value
    let seconds = (ContinuousClock.now - start).asSeconds
    let cpu = cpuSeconds() - cpu0
    try await session.close()
    await listener.close()
    precondition(received == sent, "NBS delivered \(received) of \(sent) bytes")
    return Measurement(name: onLoop ? "NBS, on the session's loop" : "NBS, 1 subflow", bytes: bytes, seconds: seconds, cpu: cpu)
}

// MARK: set-up latency

/// TCP connect to `address`, closed at once, `count` times (ms each).
func tcpConnectLatency(to address: SocketAddress, count: Int) async throws -> [Double] {
    var samples: [Double] = []
    for _ in 0..<count {
        let start = ContinuousClock.now
        let channel = try await ClientBootstrap(group: group).connect(to: address).get()
        samples.append((ContinuousClock.now - start).asSeconds * 1000)
        try await channel.close()
    }
    return samples
}

/// The round trip of one byte over an established TCP connection to an echo server: the RTT an
/// application sees, the unit in which NBS's extra set-up time is counted.
func tcpRoundTrips(to address: SocketAddress, count: Int) async throws -> [Double] {
    let channel = try await ClientBootstrap(group: group)
        .channelOption(.socketOption(.tcp_nodelay), value: 1)
        .connect(to: address)
        .flatMapThrowing { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: $0) }.get()
    var samples: [Double] = []
    try await channel.executeThenClose { inbound, outbound in
        var replies = inbound.makeAsyncIterator()
        for _ in 0..<count {
            let start = ContinuousClock.now
            try await outbound.write(ByteBuffer(bytes: [1]))
            guard try await replies.next() != nil else { throw ChannelError.eof }
            samples.append((ContinuousClock.now - start).asSeconds * 1000)
        }
    }
    return samples
}

final class Echo: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.writeAndFlush(data, promise: nil) }
}

/// A TCP listener that echoes: connects to it measure TCP set-up, one connection the RTT.
func tcpEchoServer(host: String, port: Int) async throws -> Channel {
    try await ServerBootstrap(group: group)
        .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Echo()) }
        }
        .bind(host: host, port: port).get()
}

/// Accepts `count` sessions, sends each one byte (the opener's "first byte") and drops it when the
/// opener goes.
func serveOpens(_ listener: Listener, count: Int) -> Task<Void, Error> {
    Task {
        for _ in 0..<count {
            let session = try await listener.accept()
            try await session.write(ByteBuffer(bytes: [1]))
            Task { _ = try? await session.read(); await session.abort() }
        }
    }
}

/// NBS.open to the first byte from the server, `count` times (ms each); resolving the name is part of open.
func nbsOpenLatency(peerName: String, port: Int, options: NBSOptions, count: Int) async throws -> [Double] {
    var samples: [Double] = []
    for _ in 0..<count {
        let start = ContinuousClock.now
        let session = try await NBS.open(localName: "bench.client", peerName: peerName, port: port, options: options)
        _ = try await session.read()
        samples.append((ContinuousClock.now - start).asSeconds * 1000)
        await session.abort()
    }
    return samples
}

/// Resolving the name alone, as open does it (ms each).
func resolveLatency(_ name: String, resolver: any NameResolver, count: Int) async throws -> [Double] {
    var samples: [Double] = []
    for _ in 0..<count {
        let start = ContinuousClock.now
        _ = try await resolver.resolve(name, port: 0)
        samples.append((ContinuousClock.now - start).asSeconds * 1000)
    }
    return samples
}

extension Duration {
    var asSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }
func json(_ object: [String: Any]) -> String {
    String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
}

/// The part of an open's computation that no design with a fresh X25519 exchange per session can
/// take off its path, in ms: the listener's agreement, key derivation and MAC before it can send
/// ACCEPT, then the opener's, which it needs before it can trust the verdict behind ACCEPT. Each
/// end's own key pair is made ahead, as NBS makes them (the opener's during TCP's handshake, the
/// listener's after the previous OPEN), so key generation is not counted.
func handshakeComputation(count: Int) throws -> [Double] {
    try (0..<count).map { _ in
        let opener = ClientHandshake(sourceName: "bench.client", destinationName: "bench.server", port: 1, receiveWindow: 1 << 20)
        let listenerKey = Curve25519.KeyAgreement.PrivateKey()
        let start = ContinuousClock.now
        let (accept, _) = try ServerHandshake.accept(opener.open, serverName: "bench.server", token: 1, receiveWindow: 1 << 20,
                                                     privateKey: listenerKey)
        _ = try opener.complete(with: accept)
        return (ContinuousClock.now - start).asSeconds * 1000
    }
}

/// One JSON line for a set-up measurement: medians, and NBS's extra time in round trips once the
/// name's resolution is taken off (the target: at most one). The first open is also given alone:
/// it is the one without the server's TCP Fast Open cookie. `handshake_computation_rtts` is the
/// floor of the extra that no round trip saved can remove (`handshakeComputation`), in this path's
/// round trips: where it exceeds the aim's allowance no scheduling or hop removal can meet it.
func setupReport(where place: String, tcpConnect: [Double], rtt: [Double], resolve: [Double], nbsOpen: [Double],
                 computation: [Double]) -> String {
    let extra = median(nbsOpen) - median(tcpConnect) - median(resolve)
    return json(["case": "setup_latency", "where": place, "samples": nbsOpen.count, "tcp_connect_ms_median": median(tcpConnect),
                 "nbs_first_open_ms": nbsOpen.first ?? 0,
                 "tcp_rtt_ms_median": median(rtt), "resolve_ms_median": median(resolve), "nbs_open_first_byte_ms_median": median(nbsOpen),
                 "nbs_extra_ms": extra, "nbs_extra_rtts": extra / median(rtt),
                 "handshake_computation_ms_median": median(computation), "handshake_computation_rtts": median(computation) / median(rtt)])
}

if let port = arguments.servePort {
    let name = arguments.name ?? "bench.server"
    let echo = try await tcpEchoServer(host: "::", port: port + 1)
    let listener = try await NBS.listen(localName: name, port: port, options: NBSOptions())
    try await serveOpens(listener, count: opens).value
    await listener.close()
    try await echo.close().get()
    exit(0)
}
if let host = arguments.connectAddress, let port = arguments.port, let name = arguments.name {
    var options = NBSOptions()
    if let local = arguments.local { options.localAddresses = [try SocketAddress(ipAddress: local, port: 0)] }
    // An opener with an identity key proves it after ACCEPT, so the listener's verdict waits for it:
    // the set-up without admission at OPEN, for comparison.
    if arguments.proveIdentity { options.identity = NBSIdentity() }
    let echo = try SocketAddress(ipAddress: host, port: port + 1)
    let tcpSetup = try await tcpConnectLatency(to: echo, count: opens)
    let rtt = try await tcpRoundTrips(to: echo, count: opens)
    let resolve = try await resolveLatency(name, resolver: options.resolver, count: opens)
    let nbsSetup = try await nbsOpenLatency(peerName: name, port: port, options: options, count: opens)
    print(setupReport(where: arguments.place, tcpConnect: tcpSetup, rtt: rtt, resolve: resolve, nbsOpen: nbsSetup,
                      computation: try handshakeComputation(count: opens)))
    exit(0)
}

var tcpRuns: [Measurement] = []
var nbsRuns: [Measurement] = []
var nbsOnLoopRuns: [Measurement] = []
for _ in 0..<rounds {
    tcpRuns.append(try await plainTCP(bytes: totalBytes))
    nbsRuns.append(try await nbsSession(bytes: totalBytes, onLoop: false))
    nbsOnLoopRuns.append(try await nbsSession(bytes: totalBytes, onLoop: true))
}
let echoServer = try await tcpEchoServer(host: "127.0.0.1", port: 0)
let tcpSetup = try await tcpConnectLatency(to: echoServer.localAddress!, count: opens)
let loopbackRTT = try await tcpRoundTrips(to: echoServer.localAddress!, count: opens)
try await echoServer.close().get()
var setupOptions = NBSOptions()
setupOptions.localAddresses = [try SocketAddress(ipAddress: "127.0.0.1", port: 0)]
setupOptions.resolver = StaticResolver(["bench.server": ["127.0.0.1"]])
let setupListener = try await NBS.listen(localName: "bench.server", port: 0, options: setupOptions)
let acceptor = serveOpens(setupListener, count: opens)
let nbsSetup = try await nbsOpenLatency(peerName: "bench.server", port: setupListener.port, options: setupOptions, count: opens)
try await acceptor.value
await setupListener.close()
let resolveSetup = try await resolveLatency("bench.server", resolver: setupOptions.resolver, count: opens)

func pad(_ text: String, _ width: Int) -> String { text.padding(toLength: width, withPad: " ", startingAt: 0) }
func medianRun(_ runs: [Measurement]) -> Measurement { runs.sorted { $0.gbps < $1.gbps }[runs.count / 2] }
if rounds > 0 {
    let cases = [tcpRuns, nbsRuns, nbsOnLoopRuns]
    let tcp = medianRun(tcpRuns)
    print(pad("case (median of \(rounds))", 30) + pad("Gbit/s", 10) + pad("CPU s/GiB", 12) + "ratio to TCP")
    for m in cases.map(medianRun) {
        print(pad(m.name, 30) + pad(String(format: "%.2f", m.gbps), 10) + pad(String(format: "%.3f", m.cpuPerGiB), 12) + String(format: "%.2f", m.gbps / tcp.gbps))
    }
    print("all rounds, Gbit/s: " + cases.map { runs in
        runs[0].name + " " + runs.map { String(format: "%.1f", $0.gbps) }.joined(separator: " ")
    }.joined(separator: "; "))
    for runs in cases {
        let m = medianRun(runs)
        print(json(["case": m.name, "bytes": m.bytes, "rounds": rounds, "seconds": m.seconds, "goodput_gbps": m.gbps, "cpu_s_per_gib": m.cpuPerGiB,
                    "ratio_to_tcp": m.gbps / tcp.gbps, "all_rounds_gbps": runs.map(\.gbps)]))
    }
}
let computation = try handshakeComputation(count: opens)
print(String(format: "set-up, median of %d: TCP connect %.3f ms, NBS open to first byte %.3f ms, of which the handshake's computation %.3f ms",
             opens, median(tcpSetup), median(nbsSetup), median(computation)))
print(setupReport(where: "loopback", tcpConnect: tcpSetup, rtt: loopbackRTT, resolve: resolveSetup, nbsOpen: nbsSetup, computation: computation))
