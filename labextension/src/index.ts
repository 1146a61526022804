import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  showDialog,
  WidgetTracker
} from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { terminalIcon } from '@jupyterlab/ui-components';
import { ReadonlyJSONObject } from '@lumino/coreutils';

import { ConsoleTab } from './consoletab';
import { API_NAMESPACE } from './handler';
import { twargaIcon } from './icons';
import { TwargaModel } from './model';
import { NewLabDialog } from './newlab';
// The panel and the credits are shown as soon as their plugins activate.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { TwargaPanel } from './panel';
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { CreditsStatus } from './statusbar';
import { CommandIDs, ITwargaConsoles, ITwargaModel } from './tokens';

export { TerminadoConsole } from './console';
export { ConsoleTab } from './consoletab';
export { requestAPI, TwargaAPIError } from './handler';
export { TwargaModel } from './model';
export { NewLabDialog, NewLabForm } from './newlab';
export { CommandIDs, ITwargaConsoles, ITwargaModel } from './tokens';

const CATEGORY = 'Twarga Lab';

/** The notebooks the launcher offers, relative to the user's Jupyter root. */
const NOTEBOOKS = [
  {
    path: 'twarga-lab/Dashboard.ipynb',
    label: 'Dashboard',
    caption: 'My VMs and credits'
  },
  {
    path: 'twarga-lab/Monitor.ipynb',
    label: 'Monitor',
    caption: 'Host and VM metrics'
  },
  { path: 'twarga-lab/SOC.ipynb', label: 'SOC', caption: 'Security events' },
  {
    path: 'twarga-lab/Admin.ipynb',
    label: 'Admin',
    caption: 'Users, credits and every VM'
  },
  {
    path: 'twarga-lab/Python-API.ipynb',
    label: 'Python API',
    caption: 'A tour of the Python API'
  }
];

/** The Twarga state of the page: one poll, shared by the panel and the status bar. */
const modelPlugin: JupyterFrontEndPlugin<TwargaModel> = {
  id: 'twarga-lab:model',
  description: 'Polls the Twarga Lab API for me, my VMs and the images.',
  autoStart: true,
  provides: ITwargaModel,
  activate: (app: JupyterFrontEnd): TwargaModel => new TwargaModel()
};

/** The "Twarga Lab" side panel and the command that shows it. */
const panelPlugin: JupyterFrontEndPlugin<void> = {
  id: 'twarga-lab:panel',
  description: 'My VMs, credits and quota in the left side panel.',
  autoStart: true,
  requires: [ITwargaModel],
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    model: TwargaModel,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    const { commands, shell } = app;
    const panel = new TwargaPanel({
      model,
      openConsole: vm =>
        void commands.execute(CommandIDs.openConsole, {
          id: vm.id,
          name: vm.name
        }),
      newLab: () => void commands.execute(CommandIDs.newLab)
    });
    panel.title.icon = twargaIcon;
    shell.add(panel, 'left', { rank: 600 });
    if (restorer) {
      restorer.add(panel, 'twarga-lab-panel');
    }

    commands.addCommand(CommandIDs.openPanel, {
      label: 'Open the Twarga Lab Panel',
      caption: 'My VMs, credits and quota',
      icon: twargaIcon,
      describedBy: { args: { type: 'object', properties: {} } },
      execute: () => shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.openPanel, category: CATEGORY });
    }
  }
};

/** "New lab": a dialog listing the lab templates that makes a lab; a launcher card. */
const newLabPlugin: JupyterFrontEndPlugin<void> = {
  id: 'twarga-lab:new-lab',
  description:
    'A launcher card and command that make a lab (several VMs on private networks).',
  autoStart: true,
  requires: [ITwargaModel],
  optional: [ILauncher, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    model: TwargaModel,
    launcher: ILauncher | null,
    palette: ICommandPalette | null
  ) => {
    const { commands, shell } = app;
    commands.addCommand(CommandIDs.newLab, {
      label: args => (args.launcher ? 'New Lab' : 'Twarga Lab: new lab'),
      caption:
        'Twarga Lab: new lab — several VMs on private networks, made from a template',
      icon: twargaIcon,
      describedBy: { args: { type: 'object', properties: {} } },
      execute: async () => {
        const lab = await NewLabDialog.open({ model });
        if (lab) {
          // Its VMs show there, grouped under the lab.
          shell.activateById('twarga-lab-panel');
        }
        return lab;
      }
    });
    if (launcher) {
      launcher.add({
        command: CommandIDs.newLab,
        args: { launcher: true },
        category: CATEGORY,
        rank: -1
      });
    }
    if (palette) {
      palette.addItem({ command: CommandIDs.newLab, category: CATEGORY });
    }
  }
};

/**
 * Console tabs: VM serial consoles and terminado consoles, xterm.js over a websocket.
 *
 * Both kinds are tracked, and with a layout restorer they come back after a reload:
 * a VM console by its VM id (`twarga:open-console {id, name}`), a terminado console
 * by its websocket path (`twarga:open-terminado {path, label}`).
 */
const consolesPlugin: JupyterFrontEndPlugin<ITwargaConsoles> = {
  id: 'twarga-lab:consoles',
  description: 'VM consoles (and any terminado console) in main-area tabs.',
  autoStart: true,
  provides: ITwargaConsoles,
  optional: [ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null
  ): ITwargaConsoles => {
    const { commands, shell } = app;
    const vms = new WidgetTracker<ConsoleTab>({ namespace: 'twarga-console' });
    const terminado = new WidgetTracker<ConsoleTab>({
      namespace: 'twarga-terminado'
    });

    /** Show the tab for `options.key`, opening it first if it is not open. */
    const openTab = async (
      tracker: WidgetTracker<ConsoleTab>,
      options: ConsoleTab.IOptions
    ): Promise<ConsoleTab> => {
      const existing = tracker.find(tab => tab.key === options.key);
      if (existing) {
        shell.activateById(existing.id);
        return existing;
      }
      const tab = new ConsoleTab(options);
      // Tracked before it is shown, so that the restorer knows it by name.
      await tracker.add(tab);
      shell.add(tab, 'main');
      shell.activateById(tab.id);
      return tab;
    };

    commands.addCommand(CommandIDs.openConsole, {
      label: args =>
        args.name ? `Console: ${args.name}` : 'Open a VM Console',
      caption: "Open a VM's serial console in a tab",
      icon: terminalIcon,
      describedBy: {
        args: {
          type: 'object',
          properties: {
            id: { type: 'integer', minimum: 0, description: 'The VM id' },
            name: { type: 'string', description: "The VM's name (the title)" }
          },
          required: ['id']
        }
      },
      execute: args => {
        const id = Number(args.id);
        if (!Number.isInteger(id) || id < 0) {
          throw new Error(
            `twarga:open-console needs a VM id, got ${String(args.id)}`
          );
        }
        const name =
          typeof args.name === 'string' && args.name ? args.name : `VM ${id}`;
        const settings = ServerConnection.makeSettings();
        const url = URLExt.join(
          settings.wsUrl,
          API_NAMESPACE,
          'vms',
          String(id),
          'console'
        );
        return openTab(vms, {
          key: `vm-${id}`,
          url,
          label: `Console: ${name}`,
          args: { id, name }
        });
      }
    });

    commands.addCommand(CommandIDs.openTerminado, {
      label: args =>
        args.label ? String(args.label) : 'Open a Terminado Console',
      caption:
        'Open a terminado websocket (e.g. terminals/websocket/1) in a console tab',
      icon: terminalIcon,
      describedBy: {
        args: {
          type: 'object',
          properties: {
            path: {
              type: 'string',
              description: "A websocket path under the server's base URL"
            },
            label: { type: 'string', description: 'The title of the tab' }
          },
          required: ['path']
        }
      },
      execute: args => {
        const path = String(args.path ?? '');
        if (!Private.isServerPath(path)) {
          throw new Error(
            `twarga:open-terminado needs a path on this server, got ${path}`
          );
        }
        const settings = ServerConnection.makeSettings();
        const label = args.label ? String(args.label) : `Console: ${path}`;
        return openTab(terminado, {
          key: `path-${path}`,
          url: URLExt.join(settings.wsUrl, path),
          label,
          args: { path, label }
        });
      }
    });

    if (restorer) {
      const restore = {
        args: (tab: ConsoleTab): ReadonlyJSONObject => tab.args,
        name: (tab: ConsoleTab) => tab.key
      };
      void restorer.restore(vms, {
        command: CommandIDs.openConsole,
        ...restore
      });
      void restorer.restore(terminado, {
        command: CommandIDs.openTerminado,
        ...restore
      });
    }
    return { vms, terminado };
  }
};

/** Launcher cards and palette items for the Twarga notebooks. */
const launcherPlugin: JupyterFrontEndPlugin<void> = {
  id: 'twarga-lab:launcher',
  description: 'Launcher cards for the Twarga Lab notebooks.',
  autoStart: true,
  optional: [ILauncher, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    launcher: ILauncher | null,
    palette: ICommandPalette | null
  ) => {
    const { commands } = app;
    commands.addCommand(CommandIDs.openNotebook, {
      label: args =>
        String(args.label ?? args.path ?? 'Open a Twarga Lab Notebook'),
      caption: args => String(args.caption ?? args.path ?? ''),
      icon: twargaIcon,
      describedBy: {
        args: {
          type: 'object',
          properties: {
            path: {
              type: 'string',
              description: 'The notebook, relative to the Jupyter root'
            },
            label: { type: 'string' },
            caption: { type: 'string' }
          },
          required: ['path']
        }
      },
      execute: args => Private.openNotebook(app, String(args.path ?? ''))
    });

    if (launcher) {
      NOTEBOOKS.forEach((notebook, rank) => {
        launcher.add({
          command: CommandIDs.openNotebook,
          args: { ...notebook },
          category: CATEGORY,
          rank
        });
      });
    }
    if (palette) {
      for (const notebook of NOTEBOOKS) {
        palette.addItem({
          command: CommandIDs.openNotebook,
          args: { ...notebook, label: `Open ${notebook.label} Notebook` },
          category: CATEGORY
        });
      }
    }
  }
};

/** `Credits: N` in the status bar; a click shows the side panel. */
const statusBarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'twarga-lab:status-bar',
  description: 'My Twarga Lab credits in the status bar.',
  autoStart: true,
  requires: [ITwargaModel, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    model: TwargaModel,
    statusBar: IStatusBar
  ) => {
    const item = new CreditsStatus({
      model,
      onClick: () => void app.commands.execute(CommandIDs.openPanel)
    });
    statusBar.registerStatusItem('twarga-lab:credits', {
      item,
      align: 'left',
      rank: 100
    });
  }
};

const plugins: JupyterFrontEndPlugin<any>[] = [
  modelPlugin,
  panelPlugin,
  newLabPlugin,
  consolesPlugin,
  launcherPlugin,
  statusBarPlugin
];

export default plugins;

namespace Private {
  /** Whether `path` names a place on this Jupyter server: the cookie is what authenticates. */
  export function isServerPath(path: string): boolean {
    return (
      path.length > 0 &&
      !/^[a-z]+:/i.test(path) &&
      !path.startsWith('//') &&
      !path.includes('..')
    );
  }

  /** Open a notebook, or say in a dialog why it cannot be opened. */
  export async function openNotebook(
    app: JupyterFrontEnd,
    path: string
  ): Promise<unknown> {
    try {
      await app.serviceManager.contents.get(path, { content: false });
    } catch (error) {
      const status = (error as ServerConnection.ResponseError).response?.status;
      await showDialog({
        title: 'Notebook not found',
        body:
          status === 404
            ? `${path} is not in your Jupyter folder. Copy the Twarga Lab notebooks there ` +
              '(they ship in the notebooks/ folder of Twarga Lab) and try again.'
            : `${path} cannot be opened: ${(error as Error).message ?? String(error)}`,
        buttons: [Dialog.okButton()]
      });
      return null;
    }
    return app.commands.execute('docmanager:open', { path });
  }
}
