import NIOCore
import NIOPosix

/// One timer per event loop (and check interval) drives the stall checks of every session on that
/// loop that wants them, instead of a timer per session. At 10,000 UDP sessions whose datagrams were
/// being lost, every session checked every 50 ms on timers of its own: 200,000 timers a second
/// through NIO's scheduling heap (tens of thousands of entries deep), which took a quarter of the
/// serve's CPU in `perf` and starved it of the time to read its socket, so more was lost.
///
/// A session joins with `add` when its checks start and leaves at the first tick after they
/// stopped or moved to another pace (`SessionEngine.livenessTicker`), so stopping costs nothing.
final class LivenessTicker {
    let interval: TimeAmount
    private var members: [ObjectIdentifier: SessionEngine] = [:]
    private lazy var timer = LoopTimer(on: loop, owner: self) { $0.tick() }
    private let loop: any EventLoop

    private init(loop: any EventLoop, interval: TimeAmount) {
        self.loop = loop
        self.interval = interval
    }

    func add(_ engine: SessionEngine) {
        members[ObjectIdentifier(engine)] = engine
        if !timer.isArmed { timer.arm(in: interval) }
    }

    private func tick() {
        var stopped: [ObjectIdentifier] = []
        for (key, engine) in members {
            if engine.livenessTicker === self { engine.livenessTick() }
            // Stopped or moved before this tick or by it.
            if engine.livenessTicker !== self { stopped.append(key) }
        }
        for key in stopped { members[key] = nil }
        if !members.isEmpty, !timer.isArmed { timer.arm(in: interval) }
    }

    /// The ticker of this thread's event loop for `interval`. Call on `loop`.
    static func on(_ loop: any EventLoop, interval: TimeAmount) -> LivenessTicker {
        perThread.withValue { tickers in
            if let ticker = tickers[interval.nanoseconds] { return ticker }
            let ticker = LivenessTicker(loop: loop, interval: interval)
            tickers[interval.nanoseconds] = ticker
            return ticker
        }
    }

    private static let perThread = PerThread<[Int64: LivenessTicker]> { [:] }
}
