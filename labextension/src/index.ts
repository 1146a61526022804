import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  MainAreaWidget,
  showDialog
} from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import {
  LabIcon,
  terminalIcon,
  ToolbarButton
} from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { TerminadoConsole } from './console';
import { API_NAMESPACE } from './handler';
import { TwargaModel } from './model';
import { TwargaPanel } from './panel';
import { CreditsStatus } from './statusbar';

export { TerminadoConsole } from './console';
export { requestAPI, TwargaAPIError } from './handler';
export { TwargaModel } from './model';

/** The commands this extension adds. */
export namespace CommandIDs {
  export const openPanel = 'twarga:open-panel';
  /** Args `{id, name}`: the console of one of my VMs. */
  export const openConsole = 'twarga:open-console';
  /** Args `{path, label}`: any terminado websocket under the server's ws URL. */
  export const openTerminado = 'twarga:open-terminado';
  /** Args `{path, label}`: a notebook under the Jupyter root. */
  export const openNotebook = 'twarga:open-notebook';
}

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

const twargaIcon = new LabIcon({
  name: 'twarga-lab:cloud',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16" height="16">' +
    '<path class="jp-icon3" fill="#616161" d="M19.35 10.04A7.49 7.49 0 0 0 12 4C9.11 4 ' +
    '6.6 5.64 5.35 8.04A5.994 5.994 0 0 0 0 14c0 3.31 2.69 6 6 6h13c2.76 0 5-2.24 5-5 ' +
    '0-2.64-2.05-4.78-4.65-4.96zM8 17H6v-5h2v5zm3.5 0h-2V9h2v8zm3.5 0h-2v-3h2v3z"/></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'twarga-lab:plugin',
  description:
    'Twarga Lab: my VMs in a side panel, VM consoles, launcher items and credits.',
  autoStart: true,
  optional: [ILayoutRestorer, ILauncher, IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const { commands, shell } = app;
    const model = new TwargaModel();
    const consoles = new Map<string, MainAreaWidget<TerminadoConsole>>();

    const openConsoleTab = (key: string, url: string, label: string) => {
      const existing = consoles.get(key);
      if (existing && !existing.isDisposed) {
        shell.activateById(existing.id);
        return existing;
      }
      const content = new TerminadoConsole({ url });
      const widget = new MainAreaWidget({ content });
      widget.id = `twarga-console-${key.replace(/[^A-Za-z0-9_-]/g, '-')}`;
      widget.addClass('twarga-console-tab');
      widget.title.label = label;
      widget.title.icon = terminalIcon;
      widget.title.closable = true;
      const state = document.createElement('span');
      state.className = 'twarga-console-state';
      const showState = () => {
        state.textContent = content.state;
      };
      content.stateChanged.connect(showState);
      showState();
      widget.toolbar.addItem(
        'reconnect',
        new ToolbarButton({
          label: 'Reconnect',
          tooltip: 'Open the connection again',
          onClick: () => content.reconnect()
        })
      );
      widget.toolbar.addItem('state', new Widget({ node: state }));
      consoles.set(key, widget);
      widget.disposed.connect(() => consoles.delete(key));
      shell.add(widget, 'main');
      shell.activateById(widget.id);
      return widget;
    };

    const panel = new TwargaPanel({
      model,
      openConsole: vm =>
        void commands.execute(CommandIDs.openConsole, {
          id: vm.id,
          name: vm.name
        })
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
      execute: () => shell.activateById(panel.id)
    });

    commands.addCommand(CommandIDs.openConsole, {
      label: args =>
        args.name ? `Console: ${args.name}` : 'Open a VM Console',
      caption: "Open a VM's serial console in a tab",
      icon: terminalIcon,
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
        return openConsoleTab(`vm-${id}`, url, `Console: ${name}`);
      }
    });

    commands.addCommand(CommandIDs.openTerminado, {
      label: args =>
        args.label ? String(args.label) : 'Open a Terminado Console',
      caption:
        'Open a terminado websocket (e.g. terminals/websocket/1) in a console tab',
      icon: terminalIcon,
      execute: args => {
        const path = String(args.path ?? '');
        // Only paths on this Jupyter server: the cookie is what authenticates.
        if (
          !path ||
          /^[a-z]+:/i.test(path) ||
          path.startsWith('//') ||
          path.includes('..')
        ) {
          throw new Error(
            `twarga:open-terminado needs a path on this server, got ${path}`
          );
        }
        const settings = ServerConnection.makeSettings();
        const label = args.label ? String(args.label) : `Console: ${path}`;
        return openConsoleTab(
          `path-${path}`,
          URLExt.join(settings.wsUrl, path),
          label
        );
      }
    });

    commands.addCommand(CommandIDs.openNotebook, {
      label: args =>
        String(args.label ?? args.path ?? 'Open a Twarga Lab Notebook'),
      caption: args => String(args.caption ?? args.path ?? ''),
      icon: twargaIcon,
      execute: async args => {
        const path = String(args.path ?? '');
        try {
          await app.serviceManager.contents.get(path, { content: false });
        } catch (error) {
          const status = (error as ServerConnection.ResponseError).response
            ?.status;
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
        return commands.execute('docmanager:open', { path });
      }
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
      palette.addItem({ command: CommandIDs.openPanel, category: CATEGORY });
      for (const notebook of NOTEBOOKS) {
        palette.addItem({
          command: CommandIDs.openNotebook,
          args: { ...notebook, label: `Open ${notebook.label} Notebook` },
          category: CATEGORY
        });
      }
    }

    if (statusBar) {
      const item = new CreditsStatus({
        model,
        onClick: () => void commands.execute(CommandIDs.openPanel)
      });
      statusBar.registerStatusItem('twarga-lab:credits', {
        item,
        align: 'left',
        rank: 100
      });
    }
  }
};

export default plugin;
